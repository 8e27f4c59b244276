"""Validates the latency model the way nn-Meter does: predicted vs measured latency of every deployed
bundle of one or more study folders (each precision the bundle holds), measured in the same process.

    python -m search.benchmarks.latency_model results/mnist-resnet8 [...] [--table FILE] [--out FILE.md]

Measured: the bundle's batch-1 call through the MoE runtime, minimum over ``--repeats`` after warm-up
(the quiet number the table's kernels are also timed with). Predicted: :func:`predict_bundle_latency`
on a table filled, here and first, with every kernel the bundles need. Reports each bundle's error, the
mean absolute percentage error (MAPE) and the fraction within 10%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from pipelines.deploy.kernel_profile import profile_kernels
from pipelines.deploy.latency_model import bundle_kernels, expert_calls, predict_bundle_latency
from pipelines.deploy.latency_table import LatencyTable, load_table
from pipelines.deploy.manifest import file_names, read_manifest
from pipelines.deploy.runtime import load_bundle, measure_moe_latency
from pipelines.timing import cpu_description


def bundles_of(folders: list[Path]) -> list[Path]:
    """Every bundle folder (a manifest.json) under ``folders``, sorted."""
    return sorted({path.parent for folder in folders for path in Path(folder).rglob("manifest.json")})


def _files(bundle: Path, precision: str) -> tuple[Path, list[Path], int, int] | None:
    manifest = read_manifest(bundle)
    gate, experts = file_names(manifest.num_experts, precision)
    if any(name not in manifest.files for name in (gate, *experts)):
        return None
    return bundle / gate, [bundle / name for name in experts], manifest.top_k, manifest.views


def validate(
    folders: list[Path],
    table: LatencyTable,
    repeats: int = 200,
    threads: int = 1,
    precisions: tuple[str, ...] = ("fp32", "int8"),
) -> dict:
    """Rows ``{model, precision, engine, threads, batch, predicted_ms, measured_min_ms, error}`` and the
    summary (MAPE, within 10%). Each bundle is measured and predicted on the same seeded image, so both
    see the same routing."""
    cases = []
    for bundle in bundles_of(folders):
        for precision in precisions:
            files = _files(bundle, precision)
            if files is not None:
                cases.append((bundle, precision, files))
    needed = [
        kernel for _, _, (gate, experts, _, views) in cases for kernel in bundle_kernels(gate, experts, views)
    ]
    profile_kernels(table, needed, repeats=repeats)
    rows = []
    for bundle, precision, (gate, experts, top_k, views) in cases:
        model = load_bundle(bundle, threads=threads, precision=precision, engine=table.engine)
        image = np.random.default_rng(0).standard_normal((1, *model.manifest.input_shape)).astype(np.float32)
        measured = measure_moe_latency(model, image, threads=threads, batch=1, repeats=repeats, warmup=20)
        measured_ms = measured["latency"]["min_ms"]
        calls = expert_calls(gate, len(experts), top_k, image, views)
        predicted_ms = predict_bundle_latency(gate, experts, top_k, table, views, calls)
        rows.append(
            {
                "model": str(bundle),
                "precision": precision,
                "engine": table.engine,
                "threads": threads,
                "batch": 1,
                "predicted_ms": predicted_ms,
                "measured_min_ms": measured_ms,
                "error": predicted_ms / measured_ms - 1.0,
            }
        )
    errors = np.array([abs(row["error"]) for row in rows])
    summary = {
        "models": len(rows),
        "mape": float(errors.mean()) if len(rows) else None,
        "within_10pct": float((errors <= 0.10).mean()) if len(rows) else None,
        "engine": table.engine,
        "threads": threads,
        "cpu": cpu_description(),
    }
    return {"rows": rows, "summary": summary}


def _markdown(result: dict) -> str:
    summary = result["summary"]
    lines = [
        f"# Latency model: predicted vs measured ({summary['engine']}, {summary['threads']} thread(s), batch 1)",
        "",
        f"CPU: {summary['cpu']}. {summary['models']} models; MAPE {100 * summary['mape']:.1f}%, "
        f"{100 * summary['within_10pct']:.0f}% within 10%.",
        "",
        "| model | precision | engine | threads | batch | predicted ms | measured min ms | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['precision']} | {row['engine']} | {row['threads']} | {row['batch']} "
            f"| {row['predicted_ms']:.4f} | {row['measured_min_ms']:.4f} | {100 * row['error']:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="+", type=Path, help="study folders (or any folders holding bundles)"
    )
    parser.add_argument("--table", type=Path, help="the latency table to use and fill (default: a fresh one)")
    parser.add_argument("--engine", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--precision", choices=("fp32", "int8", "both"), default="both", help="which files of each bundle"
    )
    parser.add_argument("--out", type=Path, help="write the report here (Markdown; JSON beside it)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.table or Path(scratch) / "table.json"
        table = load_table(path, args.engine, args.threads)
        precisions = ("fp32", "int8") if args.precision == "both" else (args.precision,)
        result = validate(args.folders, table, args.repeats, args.threads, precisions)
    text = _markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
