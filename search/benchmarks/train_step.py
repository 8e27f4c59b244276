"""Training-step benchmark: one SGD step (forward, loss, backward, update) of the search's networks in
fp32 and in ``precision: bf16``, the time that sets how long teachers, trials and exports train.

    python -m search.benchmarks.train_step [--arch resnet20] [--widths 1.0 0.5] [--batch 128] \
        [--threads 1] [--repeats 20] [--out results/benchmarks/train_step.md]

Each row is the median of ``--repeats`` timed steps after 5 untimed ones
(``pipelines.measure.measure_latency``), on random 28x28 RGB batches through the same
``pipelines.train.step_loss`` the training loop calls, with the CPU, threads, batch and backend written
beside it. Run it on an otherwise idle machine: a job on the other core moves these numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipelines.models import build_model
from pipelines.timing import cpu_description, measure_latency
from pipelines.train import PRECISIONS, TrainConfig, make_step, native_bf16, step_loss

__all__ = ["run", "main"]


def _stepper(arch: str, width: float, batch: int, precision: str):
    torch.manual_seed(0)
    model = build_model(arch, 3, 8, width).train()
    images, labels = torch.randn(batch, 3, 28, 28), torch.randint(0, 8, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = make_step(None, TrainConfig(batch_size=batch))

    def run() -> None:
        loss = step_loss(step, (images, labels), model, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def _measure(arch: str, widths: list[float], batch: int, threads: int, repeats: int) -> list[dict]:
    rows = []
    for width in widths:
        times = {}
        for precision in PRECISIONS:
            stats = measure_latency(
                _stepper(arch, width, batch, precision),
                backend=f"torch {precision} train step",
                threads=threads,
                batch=batch,
                warmup=5,
                repeats=repeats,
            )
            times[precision] = stats.median_ms
            rows.append({"arch": arch, "width": width, "precision": precision, **stats.as_dict()})
        rows[-1]["speedup"] = times["fp32"] / times["bf16"]
    return rows


def run(arch: str, widths: list[float], batch: int, threads: int, repeats: int, out: Path) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _measure(arch, widths, batch, threads, repeats)
    finally:  # the caller's (a test process's) thread count is not this benchmark's to keep
        torch.set_num_threads(previous)
    lines = [
        "# Training step: fp32 vs bf16 autocast",
        "",
        f"CPU: {cpu_description()}; native bfloat16: {native_bf16()}; torch {torch.__version__}; "
        f"{threads} thread(s); batch {batch}; median of {repeats} steps after 5 warm-up steps.",
        "Reproduce: `python -m search.benchmarks.train_step "
        f"--arch {arch} --widths {' '.join(map(str, widths))} --batch {batch} --threads {threads} "
        f"--repeats {repeats}`.",
        "",
        "| arch | width | precision | median ms [p10-p90] | speedup over fp32 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        lines.append(
            f"| {row['arch']} | {row['width']} | {row['precision']} | {row['median_ms']:.0f} "
            f"[{row['p10_ms']:.0f}-{row['p90_ms']:.0f}] | {speedup} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/benchmarks/train_step.md")
    args = parser.parse_args()
    path = run(args.arch, args.widths, args.batch, args.threads, args.repeats, Path(args.out))
    print(path.read_text())


if __name__ == "__main__":
    main()
