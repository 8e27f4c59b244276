"""Latency benchmark of a finished study: every trained model re-timed quietly against the int8 teacher on the
study's engine (batch 1 and batch 64, interleaved rounds), compared with what the search recorded while
its workers trained (Spearman rank correlation) and with the per-kernel latency model (MAPE, share within
10%). Writes Markdown and JSON (rows of model, mmacs, engine, threads, batch, min_ms, median_ms,
teacher_min_ms; and the comparison block).

    python -m search.benchmarks.study_latency results/bloodmnist-resnet20 --out results/benchmarks/latency.md

Run it with nothing else on the machine: these are the quiet numbers the search's are judged against.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipelines.deploy.latency_model import predict_deployed
from pipelines.deploy.latency_table import default_table_path, load_table
from pipelines.deploy.runtime import load_bundle
from pipelines.timing import cpu_description, measure_interleaved
from search.latency import reference_bundle, stored_reference
from search.record import TrialRecord
from search.setup import load_data
from search.study import load_study
from search.workspace import resolve_study_dir

__all__ = ["spearman", "error_summary", "trained_trials", "main"]


def spearman(first: list[float], second: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    from scipy.stats import spearmanr

    if len(first) < 3:
        return float("nan")
    return float(spearmanr(first, second).statistic)


def error_summary(predicted: list[float], measured: list[float]) -> dict:
    """Mean absolute percentage error and the share of models predicted within 10%."""
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
    if not errors:
        return {"predicted_mape": None, "predicted_within_10pct": None}
    return {
        "predicted_mape": float(np.mean(errors)),
        "predicted_within_10pct": float(np.mean([error <= 0.10 for error in errors])),
    }


def trained_trials(
    study: optuna.Study, folder: Path
) -> list[tuple[optuna.trial.FrozenTrial, TrialRecord, Path]]:
    """Completed trials that measured a model of their own (not repeats), with their bundle folder."""
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        bundle = folder / "trials" / f"trial_{trial.number}" / "bundle"
        if record.measurement is None or record.is_repeat or not (bundle / "manifest.json").exists():
            continue
        found.append((trial, record, bundle))
    return found


def _batch_columns(record: TrialRecord, quiet: dict) -> dict:
    """The search's ratio to the teacher at its throughput batch beside the quiet one at that batch, and the
    latency per MAC of each (none where the search timed no batch or the benchmark not that one)."""
    measured = record.measurement
    batch = (measured.batch_latency or {}).get("batch")
    if batch not in quiet or not measured.macs_ratio:
        return {}
    return {
        "batch": batch,
        "search_batch_ratio": measured.batch_latency_ratio,
        "quiet_batch_ratio": quiet[batch].ratio,
        "search_latency_per_mac": measured.latency_per_mac,
        "quiet_latency_per_mac": quiet[batch].ratio / measured.macs_ratio,
    }


def _batch_block(comparison: list[dict], limit: float | None) -> dict:
    """Spearman of search-time against quiet ratios at the throughput batch, and how many models fall on the
    same side of the latency-per-MAC limit (the study's, else 1.5) both times."""
    rows = [row for row in comparison if "quiet_batch_ratio" in row]
    if len(rows) < 2:
        return {}
    limit = limit or 1.5
    same = sum(
        (row["search_latency_per_mac"] <= limit) == (row["quiet_latency_per_mac"] <= limit) for row in rows
    )
    return {
        "spearman_batch_search_vs_quiet": spearman(
            [row["search_batch_ratio"] for row in rows], [row["quiet_batch_ratio"] for row in rows]
        ),
        "batch_models": len(rows),
        "batch": rows[0]["batch"],
        "latency_per_mac_limit": limit,
        "latency_per_mac_same_side": same,
        "latency_per_mac_within_quiet": sum(row["quiet_latency_per_mac"] <= limit for row in rows),
    }


def _batch_lines(block: dict) -> list[str]:
    if "spearman_batch_search_vs_quiet" not in block:
        return []
    return [
        f"- At batch {block['batch']} (`measure.throughput_batch`): Spearman, search-time vs quiet ratio to the "
        f"teacher, **{block['spearman_batch_search_vs_quiet']:.3f}** over {block['batch_models']} models; "
        f"{block['latency_per_mac_same_side']} of them on the same side of latency per MAC "
        f"{block['latency_per_mac_limit']:.2f}x both times ({block['latency_per_mac_within_quiet']} within it quietly)"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study folder (results/<name>)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--calls", type=int, default=10, help="calls per round at batch 1 (fewer at larger batches)"
    )
    parser.add_argument(
        "--table", type=Path, help="latency table (default: this machine's under the results root)"
    )
    parser.add_argument(
        "--exports", type=Path, nargs="*", default=[], help="export folders timed too (rows only)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/latency.md"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = resolve_study_dir(args.study)
    cfg, study = load_study(folder)
    reference = stored_reference(study)
    if reference is None:
        raise SystemExit(
            f"{folder}: the study has no latency reference; run `hycomp front {folder} --remeasure`."
        )
    engine, threads = reference.engine, reference.threads
    teacher = load_bundle(reference_bundle(folder), threads=threads, engine=engine)
    baseline = study.user_attrs.get("baseline", {})
    teacher_mmacs = baseline.get("macs", 0) / 1e6 if baseline else None
    table_path = args.table or default_table_path(folder.parent, engine, threads)
    table = load_table(table_path, engine, threads)
    # the study's own validation images: each model is routed as real inputs route it
    images = load_data(cfg).val.images[: max(args.batches)].numpy()
    rows, comparison = [], []

    def timed(name: str, bundle, mmacs: float) -> dict:
        """Interleaved statistics of ``bundle`` per batch size; one row each."""
        quiet = {}
        for batch in args.batches:
            batch_images = np.ascontiguousarray(images[:batch])
            stats = measure_interleaved(
                lambda b=bundle, x=batch_images: b(x),
                lambda x=batch_images: teacher(x),
                rounds=args.rounds,
                calls_per_round=max(1, math.ceil(args.calls / batch)),
                warmup=3,
                backend=engine,
                threads=threads,
                batch=batch,
            )
            quiet[batch] = stats
            rows.append(
                {
                    "model": name,
                    "mmacs": mmacs,
                    "engine": f"{engine} {reference.version}",
                    **stats.as_row(),
                    "macs_ratio": mmacs / teacher_mmacs if teacher_mmacs else None,
                }
            )
        return quiet

    for export in args.exports:
        report = json.loads((export / "report.json").read_text())
        mmacs = report.get("mmacs") or report.get("exported", {}).get("mmacs")
        timed(f"export {export.name}", load_bundle(export / "bundle", threads=threads, engine=engine), mmacs)
    # The predictor is judged in milliseconds and, as measured latencies are, in ratios to the teacher: this
    # VM's speed drifts between the profile and the benchmark (by 20% within a day), which ratios cancel.
    teacher_predicted = predict_deployed(reference_bundle(folder), table, image=images[:1])
    trials = trained_trials(study, folder)
    for trial, record, bundle_folder in trials:
        bundle = load_bundle(bundle_folder, threads=threads, engine=engine)
        quiet = timed(f"trial {trial.number}", bundle, record.measurement.mmacs)
        one = quiet[1] if 1 in quiet else next(iter(quiet.values()))
        try:
            predicted = predict_deployed(bundle_folder, table, image=images[:1])
        except Exception as error:  # a layout the latency model does not cover: say so in the row
            predicted = None
            print(f"trial {trial.number}: no prediction ({error})", flush=True)
        comparison.append(
            {
                "trial": trial.number,
                "mmacs": record.measurement.mmacs,
                "search_ms": trial.values[2],
                "search_ratio": record.measurement.latency_ratio,
                "quiet_ms": one.ratio * reference.teacher_median_ms,
                "quiet_ratio": one.ratio,
                "quiet_min_ms": one.candidate.min_ms,
                "teacher_min_ms": one.reference.min_ms,
                "quiet_min_ratio": one.candidate.min_ms / one.reference.min_ms,
                "predicted_ms": predicted,
                "predicted_ratio": None if predicted is None else predicted / teacher_predicted,
                **_batch_columns(record, quiet),
            }
        )
        print(
            f"trial {trial.number}: {record.measurement.mmacs:.2f} MMACs, search {trial.values[2]:.4f} ms, "
            f"quiet {one.ratio * reference.teacher_median_ms:.4f} ms (x{one.ratio:.3f}), predicted {predicted}",
            flush=True,
        )
    ratios_search = [
        row["search_ratio"] if row["search_ratio"] is not None else row["search_ms"] for row in comparison
    ]
    ratios_quiet = [row["quiet_ratio"] for row in comparison]
    with_prediction = [row for row in comparison if row["predicted_ms"] is not None]
    block = {
        "spearman_search_vs_quiet": spearman(
            [row["search_ms"] for row in comparison], [row["quiet_ms"] for row in comparison]
        ),
        "spearman_search_ratio_vs_quiet_ratio": spearman(ratios_search, ratios_quiet),
        **error_summary(
            [row["predicted_ms"] for row in with_prediction], [row["quiet_min_ms"] for row in with_prediction]
        ),
        **{
            key.replace("predicted_", "predicted_ratio_"): value
            for key, value in error_summary(
                [row["predicted_ratio"] for row in with_prediction],
                [row["quiet_min_ratio"] for row in with_prediction],
            ).items()
        },
        **_batch_block(comparison, cfg.constraints.max_latency_per_mac),
        "teacher_predicted_ms": teacher_predicted,
        "models": len(comparison),
        "predicted_models": len(with_prediction),
    }
    result = {
        "study": str(folder),
        "engine": engine,
        "engine_version": reference.version,
        "threads": threads,
        "teacher_quiet_median_ms": reference.teacher_median_ms,
        "teacher_mmacs": teacher_mmacs,
        "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m search.benchmarks.study_latency "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "table": str(table_path),
        "comparison": block,
        "models": comparison,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Latency of a study's models: search-time, quiet and predicted",
        "",
        f"Reproduce: `{result['command']}` ({result['date']}; {result['cpu']}).",
        "",
        f"Study `{folder}`: engine {engine} {reference.version}, {threads} thread(s); the int8 teacher's quiet "
        f"batch-1 median {reference.teacher_median_ms:.4f} ms, {teacher_mmacs:.2f} MMACs. Each model is timed in "
        f"{args.rounds} rounds alternating with the teacher (same engine, same run); ratio = median of the "
        "per-round ratios. Predicted: the per-kernel table (`hycomp profile`) against the quiet batch-1 minimum, "
        "and as a ratio to the teacher's predicted latency against the minimum's ratio to the teacher's minimum "
        "in the same run (this VM's speed drifts between profile and benchmark; ratios cancel that).",
        "",
        f"- Spearman rank correlation, search-time (2 workers training) vs quiet batch-1 latency: "
        f"**{block['spearman_search_vs_quiet']:.3f}** over {block['models']} models",
        f"- Predicted vs quiet measured: MAPE **{(block['predicted_mape'] or float('nan')) * 100:.1f}%**, "
        f"within 10% on **{(block['predicted_within_10pct'] or float('nan')) * 100:.0f}%** of "
        f"{block['predicted_models']} models",
        *_batch_lines(block),
        f"- The same as ratios to the teacher: MAPE {(block['predicted_ratio_mape'] or float('nan')) * 100:.1f}%, "
        f"within 10% on {(block['predicted_ratio_within_10pct'] or float('nan')) * 100:.0f}% (the teacher "
        f"predicted {teacher_predicted:.4f} ms)",
        "",
        "| trial | MMACs | search ms | quiet ms | x teacher (quiet) | predicted ms | quiet min ms "
        "| predicted x teacher | quiet min x teacher min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in comparison:
        predicted = f"{row['predicted_ms']:.4f}" if row["predicted_ms"] is not None else "-"
        ratio = f"{row['predicted_ratio']:.3f}" if row["predicted_ratio"] is not None else "-"
        lines.append(
            f"| {row['trial']} | {row['mmacs']:.2f} | {row['search_ms']:.4f} | {row['quiet_ms']:.4f} "
            f"| {row['quiet_ratio']:.3f} | {predicted} | {row['quiet_min_ms']:.4f} | {ratio} "
            f"| {row['quiet_min_ratio']:.3f} |"
        )
    lines += [
        "",
        "## Every model, each batch (min and median of the interleaved calls)",
        "",
        "| model | MMACs | engine | threads | batch | min ms | median ms | teacher min ms | x teacher | MACs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        macs_ratio = f"{row['macs_ratio']:.3f}" if row["macs_ratio"] else "-"
        lines.append(
            f"| {row['model']} | {row['mmacs']:.2f} | {row['engine']} | {row['threads']} | {row['batch']} "
            f"| {row['min_ms']:.4f} | {row['median_ms']:.4f} | {row['teacher_min_ms']:.4f} "
            f"| {row['latency_ratio']:.3f} | {macs_ratio} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(json.dumps(block, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
