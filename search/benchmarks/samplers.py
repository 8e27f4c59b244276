"""Sampler benchmark: hypervolume reached by the default sampler (TPE) and by random search at the same
budget of completed trials, on the real objective (compress, deploy to ONNX Runtime, measure).

    python -m search.benchmarks.samplers [--space search_spaces/tiny.yaml] [--data-root ../shared/data] \
        [--trials 24] [--seeds 0 1 2] [--samplers tpe random] [--out results/benchmarks/samplers.md]

Each (sampler, seed) is its own study (``samplers-<sampler>-s<seed>``, SQLite under ``--work``), run with
:func:`search.study.run_search` exactly as ``hycomp search`` runs it, with ``study.sampler.seed = seed``,
no enqueued reference trial (every trial is the sampler's choice) and the same training seed everywhere,
so that the samplers' choices are the only difference. Re-running resumes the studies.

Hypervolume comes from Optuna: ``optuna.visualization.plot_hypervolume_history`` (the history over
trials, in the study's directions) and ``optuna._hypervolume.compute_hypervolume`` for the
accuracy-MACs projection. The reference point is fixed before any sampler runs and written in the
report: accuracy 0, ``top_k.high`` x the teacher's MMACs (no trial executes more) and twice the teacher's
cached batch-1 latency; ``--reference ACC MMACS MS`` sets it explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from pipelines.errors import CompressionError
from pipelines.timing import cpu_description
from search.baseline import get_baseline
from search.config import SearchConfig, load_config
from search.objective import DIRECTIONS, OBJECTIVES, is_repeat
from search.setup import load_data
from search.study import completed_trials, evaluated_trials, run_search

__all__ = ["run", "main"]

REPO = Path(__file__).resolve().parents[2]


def reference_point(cfg: SearchConfig, record: dict) -> list[float]:
    """(accuracy, MMACs, latency ms) that every sensible trial dominates, from the teacher alone."""
    return [0.0, cfg.space.top_k.high * record["macs"] / 1e6, 2.0 * record["latency"]["median_ms"]]


def hypervolume_history(study: optuna.Study, reference: list[float]) -> list[float]:
    """Hypervolume after each completed trial (Optuna's own computation, study directions)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = optuna.visualization.plot_hypervolume_history(study, np.asarray(reference))
    return [float(value) for value in figure.data[0].y]


def accuracy_macs_hypervolume(study: optuna.Study, reference: list[float]) -> float:
    """Hypervolume of the (accuracy, MMACs) projection: free of latency-measurement noise."""
    from optuna._hypervolume import compute_hypervolume

    points = np.asarray(
        [[-trial.values[0], trial.values[1]] for trial in study.get_trials(states=(TrialState.COMPLETE,))]
    )
    bound = np.asarray([-reference[0], reference[1]])
    if len(points) == 0:
        return 0.0
    points = points[(points <= bound).all(axis=1)]  # points beyond the reference add nothing
    return float(compute_hypervolume(points, bound)) if len(points) else 0.0


def _run_one(
    cfg: SearchConfig, sampler: str, seed: int, trials: int, work: Path, reference: list[float]
) -> dict:
    options = cfg.study.sampler.options if sampler == cfg.study.sampler.name else {}
    run_cfg = cfg.replace(
        study={
            "name": f"samplers-{sampler}-s{seed}",
            "trials": trials,
            "sampler": {"name": sampler, "seed": seed, "options": options},
            "enqueue_baseline": False,
            "storage": None,
        }
    )
    started = time.perf_counter()
    for attempt in range(4):
        try:
            study = run_search(run_cfg, results=work, show_progress=False)
            break
        except CompressionError as error:
            # run_search stops after 5 failed trials in a row; a random sampler can draw that many
            # failing configurations by chance. The study resumes where it stopped.
            if attempt == 3:
                raise
            print(f"{sampler} seed {seed}: {error} Resuming.", flush=True)
    # Wall time of the study from its trials' timestamps, so a resumed run reports the original cost.
    stamps = [trial for trial in study.trials if trial.datetime_start and trial.datetime_complete]
    seconds = (
        (max(t.datetime_complete for t in stamps) - min(t.datetime_start for t in stamps)).total_seconds()
        if stamps
        else time.perf_counter() - started
    )
    history = hypervolume_history(study, reference)
    states = [trial.state for trial in study.trials]
    return {
        "sampler": sampler,
        "seed": seed,
        "completed": len(evaluated_trials(study)),
        "repeats": sum(is_repeat(trial) for trial in completed_trials(study)),
        "failed": states.count(TrialState.FAIL),
        "pruned": states.count(TrialState.PRUNED),
        "hypervolume": history[-1] if history else 0.0,
        "hypervolume_half_budget": history[len(history) // 2 - 1] if len(history) >= 2 else 0.0,
        "hypervolume_history": history,
        "hypervolume_accuracy_mmacs": accuracy_macs_hypervolume(study, reference),
        "front_size": sum(not is_repeat(trial) for trial in study.best_trials),
        "seconds": seconds,
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
    lines = [
        "# Sampler benchmark: hypervolume at equal trial budget",
        "",
        f"Reproduce: `{settings['command']}`",
        "",
        f"Run {settings['date']} on {settings['cpu']}, CPU only; versions {settings['versions']}; "
        f"{settings['minutes']:.1f} min in all.",
        "",
        "## Settings",
        "",
        f"- space `{settings['space']}` (model {settings['model']}), data `{settings['data_root']}` "
        f"({settings['dataset']}), trial budget {settings['trial_budget']}",
        f"- {settings['trials']} completed trials per study, seeds {settings['seeds']} (the sampler's seed; "
        f"training seed {settings['training_seed']} in every study), no enqueued reference trial",
        f"- samplers: {sampler_list}. TPE draws its first `n_startup_trials` (Optuna's default 10) from "
        "`RandomSampler(seed)`, so at the same seed both samplers start with the same configurations "
        "(a paired comparison); they differ from the trial after that on",
        f"- objectives {objectives}",
        f"- **reference point** (accuracy, MMACs, latency ms) = {settings['reference']} ({settings['reference_source']})",
        "- hypervolume: `optuna.visualization.plot_hypervolume_history` (3 objectives, final value and "
        "after half the budget); `optuna._hypervolume.compute_hypervolume` on (accuracy, MMACs) alone, "
        "which has no latency-measurement noise",
        "",
        "## Result (mean +- std over seeds)",
        "",
        "| sampler | HV (3 obj.) | HV at half budget | HV (acc, MMACs) | front size | repeats | failed | minutes per study |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sampler in samplers:
        mine = [row for row in rows if row["sampler"] == sampler]
        lines.append(
            f"| {sampler} | {_mean_std([row['hypervolume'] for row in mine])} "
            f"| {_mean_std([row['hypervolume_half_budget'] for row in mine])} "
            f"| {_mean_std([row['hypervolume_accuracy_mmacs'] for row in mine])} "
            f"| {_mean_std([row['front_size'] for row in mine])} "
            f"| {_mean_std([row.get('repeats', 0) for row in mine])} "
            f"| {sum(row['failed'] for row in mine)} "
            f"| {_mean_std([row['seconds'] / 60 for row in mine])} |"
        )
    if len(samplers) == 2:
        first, second = samplers
        by_seed = {(row["sampler"], row["seed"]): row for row in rows}
        seeds = [seed for seed in settings["seeds"] if (first, seed) in by_seed and (second, seed) in by_seed]
        wins = sum(
            by_seed[(first, seed)]["hypervolume"] > by_seed[(second, seed)]["hypervolume"] for seed in seeds
        )
        lines += [
            "",
            f"`{first}` reaches the larger 3-objective hypervolume in {wins} of {len(seeds)} seed(s).",
        ]
    lines += [
        "",
        "## Per study",
        "",
        "| sampler | seed | completed | repeats | failed | HV (3 obj.) | HV (acc, MMACs) | front size | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['seed']} | {row['completed']} | {row.get('repeats', 0)} | {row['failed']} "
            f"| {row['hypervolume']:.4g} | {row['hypervolume_accuracy_mmacs']:.4g} | {row['front_size']} "
            f"| {row['seconds']:.0f} |"
        )
    lines += [
        "",
        "Hypervolume is in the units of the objectives (accuracy x MMACs x ms for 3 objectives); only the "
        "comparison between samplers at the same reference point means anything. Latency is measured, so "
        "the 3-objective value carries timing noise; the (accuracy, MMACs) column does not. Repeats: "
        "configurations the sampler proposed again; their result is reused and they do not count as completed.",
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
    work: Path,
    out: Path,
    reference: list[float] | None,
    settings: dict,
) -> Path:
    data = load_data(cfg)
    _, record = get_baseline(cfg, data, work, threads=cfg.measure.latency_threads)
    source = "given with --reference"
    if reference is None:
        reference = reference_point(cfg, record)
        source = (
            f"accuracy 0, top_k.high ({cfg.space.top_k.high}) x teacher {record['macs'] / 1e6:.4g} MMACs, "
            f"2 x teacher latency {record['latency']['median_ms']:.4g} ms ({record['latency']['backend']})"
        )
    rows = []
    for seed in seeds:
        for sampler in samplers:
            row = _run_one(cfg, sampler, seed, trials, work, reference)
            print(
                f"{sampler} seed {seed}: HV {row['hypervolume']:.4g} (acc-MMACs {row['hypervolume_accuracy_mmacs']:.4g}), "
                f"{row['completed']} complete, {row['failed']} failed, {row['seconds']:.0f} s",
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
        "trials": trials,
        "seeds": seeds,
        "training_seed": cfg.seed,
        "dataset": data.name,
        "model": f"{cfg.model.arch} width {cfg.model.width}",
        "trial_budget": cfg.to_dict()["trial"],
        "sampler_options": {
            name: (cfg.study.sampler.options if name == cfg.study.sampler.name else {}) for name in samplers
        },
        "reference": reference,
        "reference_source": source,
        "teacher": {key: record[key] for key in ("key", "val_accuracy", "macs")},
    }
    _report(rows, settings, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/tiny.yaml", help="YAML search space")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("HYCOMP_DATA_ROOT", str(REPO.parent / "shared" / "data")),
        help="folder holding the dataset file (default $HYCOMP_DATA_ROOT or ../shared/data)",
    )
    parser.add_argument("--trials", type=int, default=24, help="completed trials per study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
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
        work=Path(args.work),
        out=Path(args.out),
        reference=args.reference,
        settings=settings,
    )
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
