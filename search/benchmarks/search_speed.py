"""Search-speed benchmark: what a search makes of its first minutes. Runs the study of a space with
``--workers`` processes for ``--minutes`` (teachers and their distillation targets cached beforehand, as
on any second search), then counts the models trained within that time and the hypervolume of the front
they make, against a front recorded earlier at the same reference point.

    python -m search.benchmarks.search_speed --space search_spaces/bloodmnist.yaml --workers 2 \\
        --minutes 30 --before results/bloodmnist/search_views.md --out results/benchmarks/search_speed.md

``--before`` is a study report written by ``hycomp report`` (its Pareto-front table gives the points);
``--analyze-only`` re-reads a finished benchmark study instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipelines.errors import ConfigError
from pipelines.timing import cpu_description
from search.benchmarks.samplers import _hypervolume
from search.config import load_config
from search.early_stop import EARLY_STOP
from search.record import TrialRecord
from search.setup import load_data, resolve_augment, trial_context
from search.study import run_search
from search.workspace import study_dir

__all__ = ["front_points", "window_summary", "main"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE = (0.85, 15.0, 1.5)  # accuracy, MMACs (the space's budget), batch-1 ms


def front_points(report: Path) -> list[tuple[float, float, float]]:
    """(val_accuracy, mmacs, latency_ms) of each row of the Pareto-front table of a ``hycomp report`` page."""
    lines = report.read_text().splitlines()
    try:
        start = next(index for index, line in enumerate(lines) if line.startswith("## Pareto front"))
        header_index = next(index for index in range(start, len(lines)) if lines[index].startswith("| trial"))
    except StopIteration:
        raise ConfigError(
            f"--before: {report} has no '## Pareto front' table; pass a report written by `hycomp report`."
        ) from None
    header = [cell.strip() for cell in lines[header_index].strip("|").split("|")]
    columns = [header.index(name) for name in ("val_accuracy", "mmacs", "latency_ms")]
    points = []
    for line in lines[header_index + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        points.append(tuple(float(cells[column]) for column in columns))
    return points


def hypervolumes(points: list[tuple[float, float, float]], reference: list[float]) -> tuple[float, float]:
    """(3-objective, accuracy-MMACs) hypervolume of ``points`` (accuracy max, MMACs and ms min)."""
    array = np.asarray(points, dtype=float).reshape(-1, 3)
    three = _hypervolume(
        np.column_stack([-array[:, 0], array[:, 1], array[:, 2]]),
        np.asarray([-reference[0], reference[1], reference[2]]),
    )
    two = _hypervolume(
        np.column_stack([-array[:, 0], array[:, 1]]), np.asarray([-reference[0], reference[1]])
    )
    return three, two


def window_summary(study: optuna.Study, started: datetime, minutes: float, reference: list[float]) -> dict:
    """Trainings and front of the trials that finished within ``minutes`` of ``started``."""
    end = started + timedelta(minutes=minutes)
    trained, points = 0, []
    for trial in study.get_trials(deepcopy=False):
        if trial.datetime_complete is None or trial.datetime_complete > end:
            continue
        record = TrialRecord.of(trial)
        if trial.state == TrialState.COMPLETE:
            trained += int(record.trained)
            if record.measurement is not None:
                points.append(tuple(trial.values))
    three, two = hypervolumes(points, reference)
    return {
        "trainings": trained,
        "early_stopped": _early_stops(study, end),
        "completed_trials": len(points),
        "hypervolume": three,
        "hypervolume_accuracy_mmacs": two,
    }


def _early_stops(study: optuna.Study, end: datetime) -> int:
    return sum(
        trial.state == TrialState.PRUNED
        and trial.datetime_complete is not None
        and trial.datetime_complete <= end
        and TrialRecord.of(trial).fail_reason.startswith(EARLY_STOP)
        for trial in study.get_trials(deepcopy=False)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/bloodmnist.yaml")
    parser.add_argument(
        "--data-root", default=os.environ.get("HYCOMP_DATA_ROOT", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--name", default="search-speed", help="study name of the benchmark run")
    parser.add_argument("--before", type=Path, help="a `hycomp report` page whose front is compared")
    parser.add_argument(
        "--before-trainings", type=int, help="models the --before study trained (its report's count)"
    )
    parser.add_argument("--reference", type=float, nargs=3, default=list(DEFAULT_REFERENCE))
    parser.add_argument("--analyze-only", action="store_true", help="re-read the finished study, do not run")
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/search_speed.md"))
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    cfg = load_config(args.space).replace(
        data={"root": args.data_root},
        study={"name": args.name, "trials": 1000, "timeout_minutes": args.minutes, "storage": None},
    )
    folder = study_dir(args.name)
    stamp = folder / "benchmark_start.json"
    if not args.analyze_only:
        data = load_data(cfg)
        cfg, _ = resolve_augment(cfg, data)  # the probe's cached choice, as run_search resolves it
        # Teachers and distillation targets are per-teacher products, cached for every later search.
        context, _ = trial_context(cfg, data, folder, jobs=args.workers)
        context.training_data(cfg.trial)
        folder.mkdir(parents=True, exist_ok=True)
        started = datetime.now()
        stamp.write_text(json.dumps({"started": started.isoformat()}))
        study = run_search(cfg, workers=args.workers, show_progress=False)
    else:
        started = datetime.fromisoformat(json.loads(stamp.read_text())["started"])
        study = optuna.load_study(study_name=args.name, storage=f"sqlite:///{folder / 'study.db'}")
    # Optuna stores trial times as naive local datetimes: compare like with like.
    summary = window_summary(study, started, args.minutes, args.reference)
    before = {}
    if args.before is not None:
        points = front_points(args.before)
        three, two = hypervolumes(points, args.reference)
        before = {
            "report": str(args.before),
            "front_points": points,
            "hypervolume": three,
            "hypervolume_accuracy_mmacs": two,
        }
    result = {
        "trainings_in_30_min" if args.minutes == 30 else f"trainings_in_{args.minutes:g}_min": summary[
            "trainings"
        ],
        "hypervolume_30_min" if args.minutes == 30 else f"hypervolume_{args.minutes:g}_min": summary[
            "hypervolume"
        ],
        "hypervolume_before": before.get("hypervolume"),
        "reference_point": list(args.reference),
        "hypervolume_accuracy_mmacs": summary["hypervolume_accuracy_mmacs"],
        "hypervolume_accuracy_mmacs_before": before.get("hypervolume_accuracy_mmacs"),
        "early_stopped_in_window": summary["early_stopped"],
        "completed_trials_in_window": summary["completed_trials"],
        "workers": args.workers,
        "minutes": args.minutes,
        "space": args.space,
        "study": str(folder),
        "started": started.isoformat(),
        "cpu": cpu_description(),
        "command": "python -m search.benchmarks.search_speed "  # the run's; --analyze-only only re-reads it
        + shlex.join(arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--analyze-only"),
        "before": before,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Search speed: the first minutes of a search",
        "",
        f"Reproduce: `{result['command']}` ({result['date']}, {result['cpu']}).",
        "",
        f"Space `{args.space}`, {args.workers} worker processes, {args.minutes:g} minutes from the start of "
        "`run_search` (teachers and their distillation targets cached beforehand). Reference point "
        f"(accuracy, MMACs, ms) = {list(args.reference)}.",
        "",
        "| | models trained | early-stopped | hypervolume (3 obj.) | hypervolume (acc, MMACs) |",
        "|---|---|---|---|---|",
        f"| this run, first {args.minutes:g} min | {summary['trainings']} | {summary['early_stopped']} "
        f"| {summary['hypervolume']:.5g} | {summary['hypervolume_accuracy_mmacs']:.5g} |",
    ]
    if before:
        lines.append(
            f"| before ({args.before}) | {args.before_trainings if args.before_trainings is not None else '-'} | - | {before['hypervolume']:.5g} | {before['hypervolume_accuracy_mmacs']:.5g} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(json.dumps({key: result[key] for key in list(result)[:6]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
