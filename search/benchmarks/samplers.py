"""Sampler benchmark: hypervolume of the 3-objective front against wall time, each sampler given the same
minutes on the real objective (compress, deploy, measure), or the same number of completed trials.

    python -m search.benchmarks.samplers --space search_spaces/bloodmnist_bench.yaml --minutes 4 \
        --seeds 0 1 2 --samplers tpe nsga2 gp random --jobs 2 --out results/benchmarks/samplers.md

Each (sampler, seed) is its own study (``samplers-<sampler>-s<seed>``, SQLite under ``--work``), run with
:func:`search.study.run_search` exactly as ``hycomp search`` runs it, with ``study.sampler.seed = seed``,
no enqueued reference trial and the same training seed everywhere, so that the samplers' choices are the
only difference. With ``--jobs 2`` the studies of one seed run side by side, one core each, so a burst of
load on the machine hits the samplers being compared alike.

Hypervolume is Optuna's (``optuna._hypervolume.compute_hypervolume``) over the trials completed within
each time mark since the study's first trial started. The reference point is fixed before any sampler
runs and written in the report: accuracy 0, ``top_k.high`` x the teacher's MMACs (no trial executes more)
and twice the teacher's cached batch-1 latency; ``--reference ACC MMACS MS`` sets it explicitly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from pipelines.errors import CompressionError
from pipelines.timing import cpu_description
from search.baseline import get_baseline
from search.config import SearchConfig, load_config, parse_config
from search.objective import DIRECTIONS, OBJECTIVES, is_repeat
from search.samplers import DEFAULT_OPTIONS
from search.setup import load_data, trial_context
from search.study import completed_trials, evaluated_trials, run_search
from search.workspace import study_dir

__all__ = ["run", "main", "hypervolume_at", "accuracy_macs_hypervolume", "DEFAULT_OPTIONS"]

REPO = Path(__file__).resolve().parents[2]

MARKS = (0.25, 0.5, 0.75, 1.0)  # fractions of the wall-time budget at which the hypervolume is reported


def reference_point(cfg: SearchConfig, record: dict) -> list[float]:
    """(accuracy, MMACs, latency ms) that every sensible trial dominates, from the teacher alone."""
    return [0.0, cfg.space.top_k.high * record["macs"] / 1e6, 2.0 * record["latency"]["median_ms"]]


def _hypervolume(points: np.ndarray, bound: np.ndarray) -> float:
    from optuna._hypervolume import compute_hypervolume

    if len(points) == 0:
        return 0.0
    points = points[(points <= bound).all(axis=1)]  # points beyond the reference add nothing
    return float(compute_hypervolume(points, bound)) if len(points) else 0.0


def hypervolume_at(trials: list[FrozenTrial], reference: list[float], seconds: float | None = None) -> float:
    """3-objective hypervolume (accuracy max, MMACs and ms min) of the completed ``trials`` that finished
    within ``seconds`` of the first one's start (None: all of them)."""
    done = [trial for trial in trials if trial.state == TrialState.COMPLETE and trial.values]
    if seconds is not None and done:
        start = min(trial.datetime_start for trial in trials if trial.datetime_start)
        done = [trial for trial in done if (trial.datetime_complete - start).total_seconds() <= seconds]
    points = np.asarray([[-t.values[0], t.values[1], t.values[2]] for t in done]).reshape(-1, 3)
    return _hypervolume(points, np.asarray([-reference[0], reference[1], reference[2]]))


def accuracy_macs_hypervolume(study: optuna.Study, reference: list[float]) -> float:
    """Hypervolume of the (accuracy, MMACs) projection: free of latency-measurement noise."""
    points = np.asarray(
        [[-trial.values[0], trial.values[1]] for trial in study.get_trials(states=(TrialState.COMPLETE,))]
    ).reshape(-1, 2)
    return _hypervolume(points, np.asarray([-reference[0], reference[1]]))


def _study_config(cfg: SearchConfig, sampler: str, seed: int, options: dict, trials: int, minutes) -> dict:
    return cfg.replace(
        study={
            "name": f"samplers-{sampler}-s{seed}",
            "trials": trials,
            "sampler": {"name": sampler, "seed": seed, "options": options},
            "enqueue_baseline": False,
            "storage": None,
            "timeout_minutes": minutes,
        }
    ).to_dict()


def _run_one(task: tuple) -> dict:
    """One (sampler, seed) study to its budget; runs in its own process with ``threads`` torch threads."""
    cfg_dict, sampler, seed, work, reference, minutes, threads = task
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    cfg = parse_config(cfg_dict)
    started = time.perf_counter()
    try:
        study = run_search(cfg, results=Path(work), show_progress=False)
        stopped = ""
    except CompressionError as error:
        # five failed trials in a row stop a study; what it completed still counts
        stopped = str(error)
        study = optuna.load_study(
            study_name=cfg.study.name,
            storage=f"sqlite:///{study_dir(cfg.study.name, Path(work)) / 'study.db'}",
        )
    trials = study.get_trials(deepcopy=False)
    stamps = [trial for trial in trials if trial.datetime_start and trial.datetime_complete]
    seconds = (
        (max(t.datetime_complete for t in stamps) - min(t.datetime_start for t in stamps)).total_seconds()
        if stamps
        else time.perf_counter() - started
    )
    budget = None if minutes is None else 60.0 * minutes
    in_budget = [
        trial
        for trial in completed_trials(study)
        if budget is None
        or (trial.datetime_complete - min(t.datetime_start for t in stamps)).total_seconds() <= budget
    ]
    states = [trial.state for trial in trials]
    return {
        "sampler": sampler,
        "seed": seed,
        "completed": len(evaluated_trials(study)),
        "completed_in_budget": sum(not is_repeat(trial) for trial in in_budget),
        "repeats": sum(is_repeat(trial) for trial in completed_trials(study)),
        "failed": states.count(TrialState.FAIL),
        "pruned": states.count(TrialState.PRUNED),
        "hypervolume": hypervolume_at(trials, reference, budget),
        "hypervolume_at": {
            f"{mark:g}": hypervolume_at(trials, reference, None if budget is None else mark * budget)
            for mark in MARKS
        },
        "hypervolume_accuracy_mmacs": accuracy_macs_hypervolume(study, reference),
        "front_size": sum(not is_repeat(trial) for trial in study.best_trials),
        "seconds": seconds,
        "stopped": stopped,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} +- {statistics.stdev(values):.2g}"


def _report(rows: list[dict], settings: dict, out: Path) -> None:
    samplers = list(dict.fromkeys(row["sampler"] for row in rows))
    options = settings["sampler_options"]
    sampler_list = ", ".join(f"`{name}` options {options.get(name, {})}" for name in samplers)
    objectives = ", ".join(
        f"{name} ({direction})" for name, direction in zip(OBJECTIVES, DIRECTIONS, strict=True)
    )
    minutes = settings["minutes_per_study"]
    budget = (
        f"{minutes:g} minutes of wall time per study"
        if minutes
        else f"{settings['trials']} completed trials per study"
    )
    marks = [f"{mark:g}" for mark in MARKS]
    mark_names = [f"HV at {float(mark) * minutes:g} min" if minutes else f"HV at {mark}" for mark in marks]
    lines = [
        f"# Sampler benchmark: hypervolume at equal {'wall time' if minutes else 'trial budget'}",
        "",
        f"Reproduce: `{settings['command']}`",
        "",
        f"Run {settings['date']} on {settings['cpu']}, CPU only; versions {settings['versions']}; "
        f"{settings['minutes']:.1f} min of studies in all, {settings['jobs']} at a time.",
        "",
        "## Settings",
        "",
        f"- space `{settings['space']}` (model {settings['model']}), data `{settings['data_root']}` "
        f"({settings['dataset']}), trial budget {settings['trial_budget']}",
        f"- {budget}, seeds {settings['seeds']} (the sampler's seed; training seed "
        f"{settings['training_seed']} in every study), no enqueued reference trial; studies of one seed "
        f"run side by side ({settings['jobs']} at a time, {settings['threads']} thread(s) each)",
        f"- samplers: {sampler_list}",
        f"- objectives {objectives}",
        f"- **reference point** (accuracy, MMACs, latency ms) = {settings['reference']} ({settings['reference_source']})",
        "- hypervolume: `optuna._hypervolume.compute_hypervolume` over the trials completed by each time mark "
        "(3 objectives), and on (accuracy, MMACs) alone, which has no latency-measurement noise",
        "",
        "## Result (mean +- std over seeds)",
        "",
        f"| sampler | {' | '.join(mark_names)} | HV (acc, MMACs) | trials in budget | front size | repeats | failed |",
        "|---|" + "---|" * (len(MARKS) + 5),
    ]
    for sampler in samplers:
        mine = [row for row in rows if row["sampler"] == sampler]
        cells = [_mean_std([row["hypervolume_at"][mark] for row in mine]) for mark in marks]
        lines.append(
            f"| {sampler} | {' | '.join(cells)} "
            f"| {_mean_std([row['hypervolume_accuracy_mmacs'] for row in mine])} "
            f"| {_mean_std([row['completed_in_budget'] for row in mine])} "
            f"| {_mean_std([row['front_size'] for row in mine])} "
            f"| {_mean_std([row.get('repeats', 0) for row in mine])} "
            f"| {sum(row['failed'] for row in mine)} |"
        )
    by_seed = {(row["sampler"], row["seed"]): row for row in rows}
    wins = {
        sampler: sum(
            all(
                by_seed[(sampler, seed)]["hypervolume"] >= by_seed[(other, seed)]["hypervolume"]
                for other in samplers
                if (other, seed) in by_seed
            )
            for seed in settings["seeds"]
            if (sampler, seed) in by_seed
        )
        for sampler in samplers
    }
    best = max(
        samplers, key=lambda name: statistics.mean(r["hypervolume"] for r in rows if r["sampler"] == name)
    )
    lines += [
        "",
        "Largest final hypervolume per seed: "
        + ", ".join(f"`{name}` {count} of {len(settings['seeds'])}" for name, count in wins.items())
        + f". Highest mean: `{best}`.",
        "",
        "## Per study",
        "",
        "| sampler | seed | completed (in budget) | repeats | failed | HV final | HV (acc, MMACs) | front size | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['seed']} | {row['completed']} ({row['completed_in_budget']}) "
            f"| {row.get('repeats', 0)} | {row['failed']} | {row['hypervolume']:.4g} "
            f"| {row['hypervolume_accuracy_mmacs']:.4g} | {row['front_size']} | {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "Hypervolume is in the units of the objectives (accuracy x MMACs x ms); only the comparison between "
        "samplers at the same reference point means anything. A trial still running at the end of the "
        "budget finishes, but counts only in the (acc, MMACs) column. Repeats: configurations the sampler "
        "proposed again; their result is reused and they do not count as completed.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


def run(
    cfg: SearchConfig,
    *,
    samplers: list[str],
    seeds: list[int],
    trials: int,
    minutes: float | None,
    jobs: int,
    work: Path,
    out: Path,
    reference: list[float] | None,
    options: dict[str, dict],
    settings: dict,
) -> Path:
    data = load_data(cfg)
    _, record = get_baseline(cfg, data, work, threads=cfg.measure.latency_threads)
    # The distillation targets are computed here once and kept, so no study spends its minutes on them.
    context, _ = trial_context(cfg, data, study_dir(cfg.study.name, work))
    context.training_data(cfg.trial)
    source = "given with --reference"
    if reference is None:
        reference = reference_point(cfg, record)
        source = (
            f"accuracy 0, top_k.high ({cfg.space.top_k.high}) x teacher {record['macs'] / 1e6:.4g} MMACs, "
            f"2 x teacher latency {record['latency']['median_ms']:.4g} ms ({record['latency']['backend']})"
        )
    threads = max(1, (os.cpu_count() or 1) // jobs)
    study_trials = trials if minutes is None else 10_000  # with a time budget the clock stops each study
    tasks = [
        (
            _study_config(cfg, sampler, seed, options.get(sampler, {}), study_trials, minutes),
            sampler,
            seed,
            str(work),
            reference,
            minutes,
            threads,
        )
        for seed in seeds
        for sampler in samplers
    ]
    rows = []
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        for row in pool.imap(_run_one, tasks):
            print(
                f"{row['sampler']} seed {row['seed']}: HV {row['hypervolume']:.4g} "
                f"(acc-MMACs {row['hypervolume_accuracy_mmacs']:.4g}), {row['completed_in_budget']} complete "
                f"in budget, {row['failed']} failed, {row['seconds']:.0f} s",
                flush=True,
            )
            rows.append(row)
    from pipelines.timing import measure_latency

    versions = measure_latency(lambda: None, backend="-", threads=1, batch=1, repeats=1, warmup=0).versions
    settings = {
        **settings,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_description(),
        "versions": {**versions, "optuna": optuna.__version__},
        "minutes": sum(row["seconds"] for row in rows) / 60,  # from trial timestamps: resume-proof
        "minutes_per_study": minutes,
        "jobs": jobs,
        "threads": threads,
        "trials": trials,
        "seeds": seeds,
        "training_seed": cfg.seed,
        "dataset": data.name,
        "model": f"{cfg.model.arch} width {cfg.model.width}",
        "trial_budget": cfg.to_dict()["trial"],
        "sampler_options": {name: options.get(name, {}) for name in samplers},
        "reference": reference,
        "reference_source": source,
        "teacher": {key: record[key] for key in ("key", "val_accuracy", "macs")},
    }
    _report(rows, settings, out)
    return out


def _options(values: list[str]) -> dict[str, dict]:
    options = {name: dict(value) for name, value in DEFAULT_OPTIONS.items()}
    for value in values:
        name, _, text = value.partition("=")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            raise SystemExit(
                f"--options: {value!r} is not NAME=JSON; write e.g. --options 'tpe={{\"multivariate\": true}}'"
            ) from None
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/bloodmnist_bench.yaml", help="YAML search space")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("HYCOMP_DATA_ROOT", str(REPO.parent / "shared" / "data")),
        help="folder holding the dataset file (default $HYCOMP_DATA_ROOT or ../shared/data)",
    )
    parser.add_argument("--minutes", type=float, help="wall time per study (equal-time comparison)")
    parser.add_argument(
        "--trials", type=int, default=24, help="completed trials per study (without --minutes)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "nsga2", "gp", "random"])
    parser.add_argument(
        "--options", nargs="*", default=[], help="NAME=JSON sampler options (over the defaults)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="studies run side by side")
    parser.add_argument("--subset", type=float, help="override trial.subset (fraction of the training split)")
    parser.add_argument(
        "--reference", type=float, nargs=3, metavar=("ACC", "MMACS", "MS"), help="hypervolume reference point"
    )
    parser.add_argument("--work", default="results/benchmarks/samplers", help="where the studies live")
    parser.add_argument("--out", default="results/benchmarks/samplers.md")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is printed once, below
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.trials < 2:
        parser.error("--trials: use at least 2 completed trials per study")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes: {args.minutes} must be > 0")
    if args.jobs < 1:
        parser.error(f"--jobs: {args.jobs} must be >= 1")
    cfg = load_config(args.space)
    overrides: dict = {"data": {"root": args.data_root}}
    if args.subset is not None:
        overrides["trial"] = {"subset": args.subset}
    cfg = cfg.replace(**overrides)
    settings = {
        "command": "python -m search.benchmarks.samplers "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "space": args.space,
        "data_root": args.data_root,
    }
    out = run(
        cfg,
        samplers=args.samplers,
        seeds=args.seeds,
        trials=args.trials,
        minutes=args.minutes,
        jobs=args.jobs,
        work=Path(args.work),
        out=Path(args.out),
        reference=args.reference,
        options=_options(args.options),
        settings=settings,
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
