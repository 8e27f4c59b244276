"""Which residual blocks to remove for latency: a random-weight ResNet-20 (3x28x28, int8 recipe 2) with four
blocks removed early (stages 1-2) or late (stages 2-3), with and without 50% channel pruning at multiple 16,
timed interleaved with the int8 teacher at batch 1 and 64 on each engine. At equal MACs the early blocks,
whose 16-channel 28x28 convs run int8 least efficiently, buy more time; ``remove_blocks`` picks blocks by
output change alone. Writes Markdown and JSON (rows with engine, version, threads, batch, min and median ms,
the teacher's, the latency ratio and it over the MACs ratio).

    python -m search.benchmarks.block_choice --out results/benchmarks/block_choice.md
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipelines.compress.depth import RemovedBlock, removable_blocks
from pipelines.compress.prune import PruneConfig, prune
from pipelines.deploy.engines import ENGINES, engine_available, engine_version, open_model
from pipelines.measure import count_macs
from pipelines.timing import measure_interleaved
from search.benchmarks.channel_multiple import SHAPE, deploy_int8, random_teacher

__all__ = ["VARIANTS", "build", "main"]

EARLY = ("layers.0.1", "layers.0.2", "layers.1.1", "layers.1.2")  # stages 1 and 2 (28x28, 14x14)
LATE = ("layers.1.1", "layers.1.2", "layers.2.1", "layers.2.2")  # stages 2 and 3 (14x14, 7x7)
SPREAD = ("layers.0.1", "layers.0.2", "layers.2.1", "layers.2.2")  # stages 1 and 3
# name: (blocks removed, channel sparsity at multiple 16)
VARIANTS = {
    "early 4": (EARLY, 0.0),
    "late 4": (LATE, 0.0),
    "early 4 + 50% m16": (EARLY, 0.5),
    "stages 1+3, 4 + 50% m16": (SPREAD, 0.5),
    "late 4 + 50% m16": (LATE, 0.5),
}
TIMING = {
    1: {"rounds": 15, "calls_per_round": 25, "warmup": 10},
    64: {"rounds": 7, "calls_per_round": 4, "warmup": 2},
}


def build(teacher: nn.Module, blocks: tuple[str, ...], sparsity: float, images: torch.Tensor) -> nn.Module:
    """``teacher`` with ``blocks`` replaced by :class:`RemovedBlock`, then channel-pruned at multiple 16."""
    model = copy.deepcopy(teacher)
    allowed = set(removable_blocks(model, images[:1]))
    for name in blocks:
        if name not in allowed:
            raise ValueError(f"{name} is not a removable block of this model ({sorted(allowed)})")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RemovedBlock())
    if sparsity:
        model = prune(model, PruneConfig(sparsity=sparsity, channel_multiple=16), images[:2]).model
    return model.eval()


def _report(rows: list[dict], settings: dict) -> str:
    lines = [
        "# Which blocks to remove: early against late, batch 1 and 64",
        "",
        f"{settings['teacher']}, {settings['teacher_mmacs']:.2f} MMACs; each model timed in rounds alternating "
        f"with the int8 teacher on the same engine ({settings['threads']} thread); `x teacher` = median over "
        "rounds of the two round medians' ratio; compare ratios, the ms move with the machine's load. "
        f"Written by `python -m search.benchmarks.block_choice` in {settings['seconds']:.0f} s on "
        f"{settings['machine']}.",
        "",
        "| model | blocks removed | MMACs | MACs ratio | engine | threads | batch | min ms | median ms | "
        "teacher min ms | x teacher | / MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {', '.join(row['blocks'])} | {row['mmacs']:.2f} | {row['mac_share']:.3f} | "
            f"{row['engine']} {row['engine_version']} | {row['threads']} | {row['batch']} | {row['min_ms']:.3f} | "
            f"{row['median_ms']:.3f} | {row['teacher_min_ms']:.3f} | {row['ratio']:.3f} | "
            f"{row['ratio'] / row['mac_share']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/block_choice.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    engines = tuple(engine for engine in args.engines if engine_available(engine))
    teacher = random_teacher()
    images = torch.randn(256, *SHAPE)
    teacher_macs = count_macs(teacher, images[:1])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        teacher_path = deploy_int8(teacher, folder, "teacher", images[:128])
        for index, (name, (blocks, sparsity)) in enumerate(VARIANTS.items()):
            model = build(teacher, blocks, sparsity, images)
            macs = count_macs(model, images[:1])
            path = deploy_int8(model, folder, f"variant_{index}", images[:128])
            for engine in engines:
                candidate, reference = open_model(path, engine, 1), open_model(teacher_path, engine, 1)
                for batch, timing in TIMING.items():
                    inputs = images[:batch].numpy()
                    stats = measure_interleaved(
                        lambda inputs=inputs, candidate=candidate: candidate(inputs),
                        lambda inputs=inputs, reference=reference: reference(inputs),
                        backend=engine,
                        threads=1,
                        batch=batch,
                        **timing,
                    )
                    rows.append(
                        {
                            "model": name,
                            "blocks": list(blocks),
                            "sparsity": sparsity,
                            "mmacs": macs / 1e6,
                            "mac_share": macs / teacher_macs,
                            "engine": engine,
                            "engine_version": engine_version(engine),
                            **stats.as_row(),
                            "ratio": stats.ratio,
                        }
                    )
            print(f"{name}: {macs / 1e6:.2f} MMACs timed ({time.perf_counter() - started:.0f} s)", flush=True)
    settings = {
        "teacher": "ResNet-20 (3x28x28, 8 classes), random weights, int8 recipe 2",
        "teacher_mmacs": teacher_macs / 1e6,
        "threads": 1,
        "timing": {str(batch): timing for batch, timing in TIMING.items()},
        "machine": platform.processor() or platform.machine(),
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_report(rows, settings))
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
