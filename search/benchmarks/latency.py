"""Latency benchmark: baseline vs compressed vs exported MoE, side by side, from one run.

    python -m search.benchmarks.latency results/bloodmnist-resnet20 [--export DIR ...] [--out results/benchmarks/latency.md]

Rows: baseline torch fp32 eager, baseline ONNX Runtime fp32 and int8, the best single compressed model
of the study (most accurate completed trial with one expert and quantized weights; its expert alone,
ONNX Runtime fp32 and int8) and each exported MoE (ONNX Runtime, int8), each at 1 and 2 threads and
batch 1 and 64, with the ratio to the torch fp32 baseline at the same threads and batch and the
gate + routing share of the MoE's time. Every number is the median of repeated runs after warm-up
(``pipelines.measure.measure_latency``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel, load_bundle, measure_moe_latency
from pipelines.measure import torch_runner
from pipelines.timing import measure_latency
from search.baseline import load_teacher, teacher_folder
from search.pareto import trials_table
from search.setup import load_data
from search.study import load_study
from search.workspace import resolve_study_dir

THREADS = (1, 2)
BATCHES = (1, 64)


def _repeats(batch: int) -> tuple[int, int]:
    return (200, 20) if batch == 1 else (30, 5)


def _row(name: str, backend: str, stats: dict, reference: dict | None, share: float | None = None) -> dict:
    return {
        "model": name,
        "backend": backend,
        "threads": stats["threads"],
        "batch": stats["batch"],
        "median_ms": stats["median_ms"],
        "p10_ms": stats["p10_ms"],
        "p90_ms": stats["p90_ms"],
        "ratio": stats["median_ms"] / reference["median_ms"] if reference else 1.0,
        "routing_share": share,
    }


def run(study_folder: Path, exports: list[Path] | None, out: Path) -> Path:
    cfg, study = load_study(study_folder)
    data = load_data(cfg)
    teacher = load_teacher(teacher_folder(cfg, data, study_folder.parent))
    if not exports:
        manifests = sorted((study_folder / "export").glob("trial_*/bundle/manifest.json"))
        if not manifests:
            raise SystemExit(
                f"no export under {study_folder / 'export'}: run `hycomp export {study_folder}` first"
            )
        exports = [manifest.parent.parent for manifest in manifests]
    images = data.val.images[:64].numpy()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base_fp32 = export_onnx(teacher, data.val.images[:1], scratch / "teacher.onnx")
        base_int8 = quantize_onnx_int8(base_fp32, scratch / "teacher.int8.onnx", data.train.images[:512])
        table = trials_table(study)
        single = table[(table["num_experts"] == 1) & (table["bits"] < 32)].sort_values(
            "val_accuracy", ascending=False
        )
        single_paths = {}
        single_name = None
        if not single.empty:
            trial = int(single.iloc[0]["trial"])
            bundle_folder = study_folder / "trials" / f"trial_{trial}" / "bundle"
            if (bundle_folder / "expert_0.onnx").exists():
                single_name = f"best single compressed (trial {trial}, {single.iloc[0]['sparsity']:.2f} {single.iloc[0]['pruner']}, {int(single.iloc[0]['bits'])}-bit)"
                single_paths = {
                    "fp32": bundle_folder / "expert_0.onnx",
                    "int8": bundle_folder / "expert_0.int8.onnx",
                }
        for threads in THREADS:
            for batch in BATCHES:
                repeats, warmup = _repeats(batch)
                example = torch.from_numpy(images[:batch])
                batch_images = images[:batch]
                reference = measure_latency(
                    torch_runner(teacher, example, threads),
                    backend="torch-fp32-eager",
                    threads=threads,
                    batch=batch,
                    repeats=repeats,
                    warmup=warmup,
                ).as_dict()
                rows.append(_row(f"baseline {cfg.model.arch}", "torch fp32 eager", reference, None))
                for label, path in (("onnxruntime fp32", base_fp32), ("onnxruntime int8", base_int8)):
                    model = OrtModel(path, threads=threads)
                    stats = measure_latency(
                        lambda m=model, x=batch_images: m(x),
                        backend=label,
                        threads=threads,
                        batch=batch,
                        repeats=repeats,
                        warmup=warmup,
                    )
                    rows.append(_row(f"baseline {cfg.model.arch}", label, stats.as_dict(), reference))
                for precision, path in single_paths.items():
                    if path.exists():
                        model = OrtModel(path, threads=threads)
                        stats = measure_latency(
                            lambda m=model, x=batch_images: m(x),
                            backend=f"onnxruntime {precision}",
                            threads=threads,
                            batch=batch,
                            repeats=repeats,
                            warmup=warmup,
                        )
                        rows.append(_row(single_name, f"onnxruntime {precision}", stats.as_dict(), reference))
                for export in exports:
                    bundle = load_bundle(export / "bundle", threads=threads)
                    timing = measure_moe_latency(
                        bundle, images[:batch], threads=threads, batch=batch, repeats=repeats, warmup=warmup
                    )
                    rows.append(
                        _row(
                            f"exported MoE ({export.name}, {bundle.num_experts} expert(s) top-{bundle.top_k})",
                            f"onnxruntime {bundle.precision}",
                            timing["latency"],
                            reference,
                            timing["routing_share"],
                        )
                    )
    versions = (
        rows and measure_latency(lambda: None, backend="-", threads=1, batch=1, repeats=1, warmup=0).versions
    )
    lines = [
        "# Latency benchmark",
        "",
        f"Study `{study.study_name}`, exports {', '.join(f'`{export}`' for export in exports)}; run {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, "
        f"CPU only, {torch.get_num_threads()} torch threads available. Versions: {versions}.",
        "Each cell: median of repeated runs after warm-up (p10-p90 in brackets), milliseconds per call (a call = one batch). "
        "Ratio: to the torch fp32 eager baseline at the same threads and batch. Routing share: fraction of the MoE call "
        "spent in the gate, top-k selection and gathering/combining.",
        "",
    ]
    for export in exports:
        if not (export / "report.json").exists():
            continue
        report = json.loads((export / "report.json").read_text())
        exported = report["exported"]
        lines += [
            f"- Exported point {export.name}: trial {report['trial']} ({report['params']}), test accuracy "
            f"{exported['test_accuracy']:.4f} (baseline {report['baseline']['test_accuracy']:.4f}), "
            f"{exported['mmacs']:.3f} MMACs per input (baseline {report['baseline']['mmacs']:.3f}), "
            f"{exported['size_kb']:.1f} KB packed; picked because: {report.get('picked_because', '-')}.",
        ]
    lines.append("")
    lines += [
        "| model | backend | threads | batch | median ms [p10-p90] | ratio to torch fp32 | routing share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = f"{row['routing_share']:.1%}" if row["routing_share"] is not None else ""
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['threads']} | {row['batch']} | {row['median_ms']:.3f} [{row['p10_ms']:.3f}-{row['p90_ms']:.3f}] "
            f"| {row['ratio']:.3f}x | {share} |"
        )
    lines.append("")
    lines.append(
        "No backend here has sub-8-bit kernels: 4- and 6-bit weights run on the int8 engine (they change size and accuracy, not speed)."
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study folder, e.g. results/bloodmnist-resnet20")
    parser.add_argument(
        "--export", nargs="+", help="export folder(s) to benchmark (default: every one under <study>/export/)"
    )
    parser.add_argument("--out", default="results/benchmarks/latency.md")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    np.random.seed(0)
    exports = [Path(folder) for folder in args.export] if args.export else None
    path = run(resolve_study_dir(args.study), exports, Path(args.out))
    print(path.read_text())


if __name__ == "__main__":
    main()
