"""Latency against channel multiple (and depth) for pruned ResNet-20s at equal MACs, on both CPU engines.

    python -m search.benchmarks.channel_multiple [--out results/benchmarks/channel_multiple.md] [--quick]

ResNet-20s for BloodMNIST's shapes (3x28x28, 8 classes; random weights with BatchNorm statistics from
random images: timing does not depend on accuracy) are pruned with :func:`pipelines.compress.prune.prune`
at each ``channel_multiple`` in (4, 8, 16, 32), at the sparsity whose MACs come closest to each target
share of the teacher's MACs, and some are made shallower with :func:`pipelines.compress.depth.remove_blocks`.
Each is deployed int8 (ONNX export + ``quantize_onnx_int8``, as trials are) and timed interleaved with the
unpruned int8 teacher on the same engine (:func:`pipelines.timing.measure_interleaved`), 1 thread, batch
1 and 64. Compare the ratios: they were measured side by side; the milliseconds move with the machine's load.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.compress.depth import DepthConfig, remove_blocks
from pipelines.compress.prune import PruneConfig, prune
from pipelines.deploy.engines import ENGINES, engine_available, engine_version, open_model
from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.measure import count_macs
from pipelines.models import ResNet, build_model
from pipelines.timing import measure_interleaved

__all__ = ["Variant", "deploy_int8", "random_teacher", "sparsity_for_macs", "variants", "run", "main"]

MULTIPLES = (4, 8, 16, 32)
MAC_TARGETS = (0.25, 0.40, 0.60)  # shares of the teacher's MACs that the pruned models aim at
DEPTHS = ((2, 0.0, 8), (4, 0.0, 8), (6, 0.0, 8), (3, 0.3, 8))  # (blocks_removed, sparsity, channel_multiple)
BATCHES = (1, 64)
THREADS = 1
SHAPE = (3, 28, 28)
CLASSES = 8
STAGE_WIDTHS = (16, 32, 64)
SPARSITIES = tuple(round(0.05 + 0.0125 * step, 4) for step in range(69))  # 0.05 .. 0.9


@dataclass(frozen=True)
class Variant:
    name: str
    channel_multiple: int
    blocks_removed: int
    sparsity: float
    target: float | None  # share of the teacher's MACs aimed at (None: a depth variant)


def _kept(channels: int, sparsity: float, multiple: int) -> int:
    """Channels a conv of ``channels`` keeps (the rule of pipelines.compress._nni.layer_ratios)."""
    keep = channels * (1.0 - sparsity)
    if multiple > 1 and channels >= multiple:
        keep = max(multiple, round(keep / multiple) * multiple)
    return min(channels, max(1, round(keep)))


@functools.cache
def _resnet20_macs(widths: tuple[int, ...], shape: tuple[int, ...]) -> int:
    return count_macs(ResNet([3, 3, 3], list(widths), shape[0], CLASSES), torch.zeros(1, *shape))


def sparsity_for_macs(target_macs: float, multiple: int, example: torch.Tensor) -> tuple[float, int]:
    """The sparsity of the grid whose pruned ResNet-20 (every conv of a stage keeps the same channels, as the
    dependency groups make it) has MACs closest to ``target_macs``; and those MACs. Counted on a ResNet built
    with the kept widths, so the search costs no NNI run."""
    best = (float("inf"), SPARSITIES[0], 0)
    for sparsity in SPARSITIES:
        widths = tuple(_kept(width, sparsity, multiple) for width in STAGE_WIDTHS)
        macs = _resnet20_macs(widths, tuple(example.shape[1:]))
        distance = abs(macs - target_macs)
        if distance < best[0] - 1e-9:
            best = (distance, sparsity, macs)
    return best[1], best[2]


def variants(teacher_macs: int, example: torch.Tensor) -> list[Variant]:
    """The models of the table: per multiple and MAC target the closest sparsity, then the depth variants."""
    rows = []
    for target in MAC_TARGETS:
        for multiple in MULTIPLES:
            sparsity, _ = sparsity_for_macs(target * teacher_macs, multiple, example)
            rows.append(Variant(f"pruned {target:.0%} m{multiple}", multiple, 0, sparsity, target))
    for blocks, sparsity, multiple in DEPTHS:
        name = f"depth -{blocks}" + (f" + pruned {sparsity:g} m{multiple}" if sparsity else "")
        rows.append(Variant(name, multiple, blocks, sparsity, None))
    return rows


def random_teacher(seed: int = 0) -> nn.Module:
    """A ResNet-20 with BatchNorm statistics of random images (realistic activation ranges for int8)."""
    torch.manual_seed(seed)
    model = build_model("resnet20", SHAPE[0], CLASSES).train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(64, *SHAPE))
    return model.eval()


def _build(teacher: nn.Module, variant: Variant, images: torch.Tensor) -> nn.Module:
    model = teacher
    if variant.blocks_removed:
        model = remove_blocks(model, DepthConfig(blocks_removed=variant.blocks_removed), images).model
    if variant.sparsity:
        config = PruneConfig(sparsity=variant.sparsity, channel_multiple=variant.channel_multiple)
        model = prune(model, config, images[:2]).model
    return model.eval()


def deploy_int8(model: nn.Module, folder: Path, name: str, calibration: torch.Tensor) -> Path:
    """``model`` exported to ``folder/<name>.onnx`` and quantized by the current int8 recipe; the int8 path."""
    fp32 = export_onnx(model, calibration[:2], folder / f"{name}.onnx")
    return quantize_onnx_int8(fp32, folder / f"{name}.int8.onnx", calibration.numpy())


def _timing(batch: int, quick: bool) -> dict:
    if batch == 1:
        return {"rounds": 6 if quick else 15, "calls_per_round": 10 if quick else 25, "warmup": 10}
    return {"rounds": 3 if quick else 7, "calls_per_round": 2 if quick else 4, "warmup": 2}


def run(out: Path, quick: bool = False, engines: tuple[str, ...] = ENGINES) -> list[dict]:
    """Build, deploy and time every variant; write ``out`` (markdown) and ``out.json``. Returns the rows."""
    started = time.perf_counter()
    engines = tuple(engine for engine in engines if engine_available(engine))
    teacher = random_teacher()
    images = torch.randn(256, *SHAPE)
    example = images[:1]
    teacher_macs = count_macs(teacher, example)
    chosen = variants(teacher_macs, example)
    if quick:
        chosen = [variant for variant in chosen if variant.target in (None, 0.4)][:6]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher_path = deploy_int8(teacher, folder, "teacher", images[:128])
        for index, variant in enumerate(chosen):
            model = _build(teacher, variant, images)
            macs = count_macs(model, example)
            path = deploy_int8(model, folder, f"variant_{index}", images[:128])
            for engine in engines:
                candidate = open_model(path, engine, THREADS)
                reference = open_model(teacher_path, engine, THREADS)
                for batch in BATCHES:
                    inputs = images[:batch].numpy()
                    stats = measure_interleaved(
                        lambda candidate=candidate, inputs=inputs: candidate(inputs),
                        lambda reference=reference, inputs=inputs: reference(inputs),
                        backend=engine,
                        threads=THREADS,
                        batch=batch,
                        **_timing(batch, quick),
                    )
                    rows.append(
                        {
                            "model": variant.name,
                            "channel_multiple": variant.channel_multiple,
                            "blocks_removed": variant.blocks_removed,
                            "sparsity": variant.sparsity,
                            "mac_target": variant.target,
                            "mmacs": macs / 1e6,
                            "mac_share": macs / teacher_macs,
                            "engine": engine,
                            "engine_version": engine_version(engine),
                            "threads": THREADS,
                            "batch": batch,
                            "min_ms": stats.candidate.min_ms,
                            "median_ms": stats.candidate.median_ms,
                            "teacher_min_ms": stats.reference.min_ms,
                            "teacher_median_ms": stats.reference.median_ms,
                            "ratio": stats.ratio,
                        }
                    )
            print(f"{variant.name}: {macs / 1e6:.2f} MMACs timed ({time.perf_counter() - started:.0f} s)")
    settings = {
        "teacher": "resnet20 (3x28x28, 8 classes), random weights, int8 QDQ",
        "teacher_mmacs": teacher_macs / 1e6,
        "threads": THREADS,
        "timing": {str(batch): _timing(batch, quick) for batch in BATCHES},
        "ratio": "median over interleaved rounds of candidate / teacher round medians",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
        "quick": quick,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    out.write_text(_report(rows, settings))
    return rows


def _report(rows: list[dict], settings: dict) -> str:
    lines = [
        "# Latency against channel multiple and depth: pruned ResNet-20s (int8), 1 thread",
        "",
        f"Teacher: {settings['teacher']}, {settings['teacher_mmacs']:.2f} MMACs. Each model timed interleaved "
        "with the int8 teacher on the same engine; `ratio` = its latency / the teacher's (median over rounds "
        "of the two round medians): compare ratios, the ms move with the shared machine's load. "
        f"Written by `python -m search.benchmarks.channel_multiple` in {settings['seconds']:.0f} s.",
        "",
        "| model | multiple | blocks removed | MMACs | MAC share | engine | batch | min ms | median ms | "
        "teacher min ms | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['channel_multiple']} | {row['blocks_removed']} | {row['mmacs']:.2f} | "
            f"{row['mac_share']:.2f} | {row['engine']} {row['engine_version']} | {row['batch']} | "
            f"{row['min_ms']:.3f} | {row['median_ms']:.3f} | {row['teacher_min_ms']:.3f} | {row['ratio']:.3f} |"
        )
    lines += ["", "## Mean ratio per channel multiple (pruned rows, the three MAC targets)", ""]
    lines += ["| engine | batch | " + " | ".join(f"m{multiple}" for multiple in MULTIPLES) + " |"]
    lines += ["|---|---|" + "---|" * len(MULTIPLES)]
    for engine in sorted({row["engine"] for row in rows}):
        for batch in BATCHES:
            cells = []
            for multiple in MULTIPLES:
                picked = [
                    row
                    for row in rows
                    if row["engine"] == engine
                    and row["batch"] == batch
                    and row["channel_multiple"] == multiple
                    and row["mac_target"] is not None
                ]
                if picked:
                    ratio = np.mean([row["ratio"] for row in picked])
                    share = np.mean([row["mac_share"] for row in picked])
                    cells.append(f"{ratio:.3f} (MACs {share:.2f})")
                else:
                    cells.append("-")
            lines.append(f"| {engine} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/channel_multiple.md"))
    parser.add_argument("--quick", action="store_true", help="fewer models and repeats (a smoke run)")
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
