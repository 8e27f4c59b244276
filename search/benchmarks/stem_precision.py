"""The int8 stem against the fp32 stem (int8 recipes 1 and 2) on a study's teacher and exported single nets.

    python -m search.benchmarks.stem_precision results/search-speed \
        --exports results/search-speed/export/trial_169_retrained [--out results/benchmarks/stem_precision.md]

Each model's own fp32 ONNX file (kept in its bundle) is quantized twice with
:func:`pipelines.deploy.int8.quantize_onnx_int8`, with the stem in int8 (recipe 1) and in fp32 (recipe 2, the
default), calibrated on the same training images as the search does. Every export is timed interleaved with the
teacher made by the same recipe (:func:`pipelines.timing.measure_interleaved`), on both engines, 1 thread, batch
1 and 64, and its validation accuracy is computed for both files (the test split is not read). Issue #25 asks
for a batch-64 latency ratio within 1.5x the MACs ratio: the report gives ``ratio_over_macs`` for each.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.deploy.engines import ENGINES, engine_available, engine_version, open_model
from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.manifest import read_manifest
from pipelines.errors import ConfigError
from pipelines.timing import measure_interleaved
from search.export import bundle_accuracy
from search.latency import reference_bundle
from search.setup import load_data
from search.study import load_study

__all__ = ["main", "run"]

RECIPES = {1: False, 2: True}  # int8 recipe: is the stem kept in fp32
BATCHES = (1, 64)
THREADS = 1
CALIBRATION = 512  # training images, as the search's deployment uses


def _single_net(folder: Path) -> Path:
    """The fp32 ONNX file of a one-expert bundle in ``folder`` (an export folder or its bundle)."""
    bundle = folder / "bundle" if (folder / "bundle" / "manifest.json").exists() else folder
    manifest = read_manifest(bundle)
    if manifest.num_experts != 1 or manifest.layout != "separate":
        raise ConfigError(
            f"--exports: {folder} holds a {manifest.num_experts}-expert {manifest.layout} bundle; this benchmark "
            "re-quantizes single nets only."
        )
    return bundle / "expert_0.onnx"


def _mmacs(folder: Path) -> float:
    report = json.loads((folder / "report.json").read_text())
    return float(report["exported"]["mmacs"])


def run(study_folder: Path, exports: list[Path], rounds: int, scratch: Path) -> dict:
    cfg, study = load_study(study_folder)
    data = load_data(cfg)
    calibration = data.train.images[:CALIBRATION].numpy()
    val_images, val_labels = data.val.images.numpy(), data.val.labels.numpy()
    teacher_mmacs = study.user_attrs.get("baseline", {}).get("macs", 0) / 1e6
    sources = {"teacher": reference_bundle(study_folder) / "expert_0.onnx"}
    sources.update({folder.name: _single_net(folder) for folder in exports})
    files: dict[tuple[str, int], Path] = {}
    accuracy: dict[str, dict[int, float]] = {}
    for name, source in sources.items():
        for recipe, float_stem in RECIPES.items():
            out = scratch / f"{name}.recipe{recipe}.int8.onnx"
            files[name, recipe] = quantize_onnx_int8(source, out, calibration, float_stem=float_stem)
            accuracy.setdefault(name, {})[recipe] = bundle_accuracy(
                open_model(out, "onnxruntime", THREADS), val_images, val_labels
            )
    engines = [engine for engine in ENGINES if engine_available(engine)]
    rows = []
    for folder in exports:
        mmacs = _mmacs(folder)
        for engine in engines:
            for batch in BATCHES:
                images = np.ascontiguousarray(val_images[:batch])
                for recipe in RECIPES:
                    student = open_model(files[folder.name, recipe], engine, THREADS)
                    teacher = open_model(files["teacher", recipe], engine, THREADS)
                    stats = measure_interleaved(
                        lambda model=student, x=images: model(x),
                        lambda model=teacher, x=images: model(x),
                        rounds=rounds,
                        calls_per_round=20 if batch == 1 else 3,
                        warmup=5 if batch == 1 else 2,
                        backend=engine,
                        threads=THREADS,
                        batch=batch,
                    )
                    macs_ratio = mmacs / teacher_mmacs
                    rows.append(
                        {
                            "model": f"export {folder.name}",
                            "recipe": recipe,
                            "stem": "fp32" if RECIPES[recipe] else "int8",
                            "mmacs": mmacs,
                            "engine": f"{engine} {engine_version(engine)}",
                            **stats.as_row(),
                            "macs_ratio": macs_ratio,
                            "ratio_over_macs": stats.ratio / macs_ratio,
                        }
                    )
                    print(
                        f"{folder.name} {engine} batch {batch} recipe {recipe}: x{stats.ratio:.3f} the teacher, "
                        f"{stats.ratio / macs_ratio:.2f}x its MACs ratio",
                        flush=True,
                    )
    return {
        "study": str(study_folder),
        "teacher_mmacs": teacher_mmacs,
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rounds": rounds,
        "val_accuracy": accuracy,
        "rows": rows,
    }


def _markdown(result: dict, command: str) -> str:
    lines = [
        "# The int8 stem against the fp32 stem (int8 recipes 1 and 2)",
        "",
        f"Study `{result['study']}`, {result['date']}; teacher {result['teacher_mmacs']:.2f} MMACs. Reproduce: "
        f"`{command}`.",
        "",
        "Each model's own fp32 ONNX file quantized twice (stem in int8: recipe 1; stem in fp32: recipe 2, the "
        "default), each export timed interleaved with the teacher of the same recipe "
        f"({result['rounds']} alternating rounds, ratio = median of the per-round ratios), 1 thread.",
        "",
        "Validation accuracy of each int8 file:",
        "",
        "| model | stem int8 (recipe 1) | stem fp32 (recipe 2) |",
        "|---|---|---|",
        *[
            f"| {name} | {100 * by_recipe[1]:.2f}% | {100 * by_recipe[2]:.2f}% |"
            for name, by_recipe in result["val_accuracy"].items()
        ],
        "",
        "| model | stem | engine | threads | batch | min ms | median ms | teacher min ms | x teacher | MACs ratio "
        "| x teacher / MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['stem']} | {row['engine']} | {row['threads']} | {row['batch']} | "
            f"{row['min_ms']:.4f} | {row['median_ms']:.4f} | {row['teacher_min_ms']:.4f} | "
            f"{row['latency_ratio']:.3f} | {row['macs_ratio']:.3f} | {row['ratio_over_macs']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--exports", type=Path, nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/stem_precision.md"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hycomp-stem-") as scratch:
        result = run(args.study, args.exports, args.rounds, Path(scratch))
    command = "python -m search.benchmarks.stem_precision " + " ".join(
        [str(args.study), "--exports", *map(str, args.exports), "--out", str(args.out)]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_markdown(result, command))
    args.out.with_suffix(".json").write_text(json.dumps({**result, "command": command}, indent=1))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
