"""The quality experiment on a finished study: does the exported MoE beat a plainly trained small net?

    hycomp experiment results/bloodmnist-resnet20 --trial N [--seeds 0 1 2] \
        [--jobs 2] [--also M ...] [--report-only] [--quiet] [--out results/bloodmnist-resnet20/experiment/REPORT.md]

``--jobs 2`` runs two (row, seed) pairs at once, each process pinned to its own share of the CPUs (with 2
cores: one thread each; small-batch training of these nets gains little from a second thread), the pairs
that train the most epochs first so the workers finish together. Each finished (row, seed) is saved to ``REPORT.seeds.json``; running
again reuses the saved pairs whose configuration (or control width) is unchanged, so an interrupted
experiment resumes and ``--also`` adds rows without re-running the others. ``--report-only`` writes the
report from the saved pairs alone while (or after) a run is still going, each row saying how many seeds it holds.

Rows, each at the study's full export budget, over several seeds (mean +- std of TEST accuracy; the
test split is read here only to report, nothing is chosen with it):
  1. the fp32 teacher (cached baseline; one seed);
  2. the chosen trial's configuration (the exported MoE), compressed again per seed;
  3. the best single compressed model (:func:`best_single`: the most accurate 1-expert trial on validation
     among those within 5% of the exported trial's MACs), per seed; ``--single-from STUDY`` takes it from
     another study of the same setup (data, teachers, budget), e.g. a MoE-only study against the default one;
     (``--also M``: trial M's configuration too, e.g. the best multi-expert point when a single was exported);
  4. the "no search" control: the same architecture family trained from scratch, plainly (no pruning,
     no distillation), its width chosen so its MACs match the exported MoE's, with the teacher's
     training recipe and epochs;
each with MACs per input, packed size and batch-1 latency on the int8 engine (ONNX Runtime, 1 thread).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from optuna.trial import TrialState
from torch import nn

from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel, load_bundle, measure_moe_latency
from pipelines.errors import ConfigError
from pipelines.measure import count_macs, packed_size_bytes
from pipelines.models import ModelSpec
from pipelines.timing import measure_latency
from pipelines.train import evaluate, train
from search.baseline import teacher_recipe
from search.candidates import find_candidate
from search.config import setup_fingerprint
from search.evaluation import TrialContext, estimate_cost, train_and_measure
from search.experiment_report import CONTROL, MOE, SINGLE, ExperimentRun, write_report
from search.export import bundle_accuracy
from search.pareto import trials_table
from search.pool import run_pinned
from search.progress import Units
from search.record import TrialRecord
from search.setup import load_data, trial_context
from search.study import load_study


def _compressed_row(
    ctx: TrialContext, params: dict, seed: int, folder: Path, threads: int, label: str = "compress"
) -> dict:
    """One seed of a compressed row: the configuration re-run at the full ``export:`` budget. At the study's
    seed, a model that ``hycomp export --candidates`` already retrained with this configuration and setup
    is that run (the same training, the exported model itself): it is measured, not trained again."""
    data = ctx.data
    prepared = find_candidate(ctx.cfg, ctx.study_folder, params) if seed == ctx.cfg.seed else None
    if prepared is not None:
        folder, record = prepared
        bundle = load_bundle(folder / "bundle", threads=threads)
        latency = measure_moe_latency(
            bundle, data.val.images[:1].numpy(), threads=threads, batch=1, repeats=100, warmup=5
        )["latency"]["median_ms"]
    else:
        record = train_and_measure(
            ctx, params, ctx.cfg.export, folder, seed=seed, threads=threads, repeats=100, label=label
        )
        bundle = load_bundle(folder / "bundle", threads=threads)
        latency = record.measurement.latency_ms
    measured = record.measurement
    test_images, test_labels = data.test.images.numpy(), data.test.labels.numpy()
    views = {}
    if bundle.views > 1:  # the same deployed models with one plain pass: what the views add
        views_used, bundle.views = bundle.views, 1
        views = {"test_one_view": [bundle_accuracy(bundle, test_images, test_labels)]}
        bundle.views = views_used
    return {
        "test": [bundle_accuracy(bundle, test_images, test_labels)],
        **views,
        "val": [measured.val_accuracy],
        "mmacs": measured.mmacs,
        "size_kb": measured.size_kb,
        "latency_ms": [latency],
        "params": params,
        "routing_per_class": measured.routing_per_class,  # validation, first choice
        "from": str(folder) if prepared is not None else "trained in this run",
    }


def _width_for_macs(spec: ModelSpec, data, target_macs: float) -> float:
    """The width multiplier whose model (``spec`` at that width) has MACs per input closest to ``target_macs`` (bisection on the
    measured count: channels are whole numbers, so MACs grow with width squared only roughly)."""

    def macs(width: float) -> float:
        return count_macs(_at_width(spec, data, width), data.val.images[:2])

    low, high = 0.0625, 8.0
    for _ in range(30):
        middle = math.sqrt(low * high)  # MACs ~ width^2: bisect on a log scale
        if macs(middle) < target_macs:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda width: abs(macs(width) - target_macs))


def _at_width(spec: ModelSpec, data, width: float) -> nn.Module:
    """The untrained model of ``spec`` scaled to ``width`` (registry models only: ModelSpec says so)."""
    return replace(spec, width=width, checkpoint=None).build(data.channels, data.num_classes, data.image_size)


def _control_row(cfg, data, width: float, seed: int, scratch: Path, threads: int) -> dict:
    """One seed of the "no search" control: ``arch`` at ``width`` trained from scratch with the teacher's
    own recipe (epochs, schedule, augmentation), no pruning and no distillation, deployed int8."""
    torch.manual_seed(seed)
    model = _at_width(cfg.model.spec, data, width)
    train(model, data.train, teacher_recipe(cfg).replace(seed=seed))
    fp32 = export_onnx(model, data.val.images[:1], scratch / f"control-{seed}.onnx")
    int8 = quantize_onnx_int8(fp32, scratch / f"control-{seed}.int8.onnx", data.train.images[:512])
    engine = OrtModel(int8, threads=threads)
    logits = np.concatenate(
        [engine(data.test.images[i : i + 256].numpy()) for i in range(0, len(data.test), 256)]
    )
    image = data.val.images[:1].numpy()
    latency = measure_latency(
        lambda: engine(image), backend="onnxruntime-int8", threads=threads, batch=1, repeats=200
    ).median_ms
    return {
        "test": [float((logits.argmax(1) == data.test.labels.numpy()).mean())],
        "torch_test": [evaluate(model, data.test)],
        "mmacs": count_macs(model, data.val.images[:8]) / 1e6,
        "size_kb": packed_size_bytes(model, 8) / 1024,
        "latency_ms": [latency],
        "width": width,
    }


MACS_TOLERANCE = 0.05  # "equal MACs": the best single net is looked for within this fraction of the MoE's


def best_single(table, mmacs: float) -> int | None:
    """The trial number of the most accurate (validation) single compressed net of a trials ``table``
    (:func:`search.pareto.trials_table`) within :data:`MACS_TOLERANCE` of ``mmacs``; with none that close,
    the most accurate single compressed net at any MACs. None when the table holds no compressed single net."""
    removed = table["blocks_removed"].fillna(0) if "blocks_removed" in table else 0
    singles = table[(table["num_experts"] == 1) & ((table["sparsity"] > 0) | (removed > 0))]
    singles = singles[singles["val_accuracy"].notna()]
    if singles.empty:
        return None
    near = singles[(singles["mmacs"] - mmacs).abs() <= MACS_TOLERANCE * mmacs]
    pool = near if not near.empty else singles
    ranked = pool.sort_values(["val_accuracy", "trial"], ascending=[False, True])  # ties: the earliest trial
    return int(ranked.iloc[0]["trial"])


@dataclass
class _Setup:
    """What every seed of one experiment shares (built once per process)."""

    cfg: object
    ctx: TrialContext
    params: dict
    single_trial: int | None
    single_params: dict | None
    single_from: Path | None  # the study the best single net comes from, when not this one
    configs: dict[int, dict]  # every completed trial's configuration, by number (for --also)


@functools.cache
def _setup(study_folder: Path, trial_number: int, single_from: Path | None = None) -> _Setup:
    cfg, study = load_study(study_folder)
    trial = next((t for t in study.trials if t.number == trial_number), None)
    if trial is None or TrialRecord.of(trial).config is None and not trial.params:
        raise ConfigError(f"--trial {trial_number}: no such completed trial in {study_folder}.")
    data = load_data(cfg)
    context, _ = trial_context(cfg, data, study_folder)  # teachers cached by the search: loaded, not trained
    table = trials_table(study)
    exported = table[table["trial"] == trial_number]
    mmacs = (
        float(exported["mmacs"].iloc[0])
        if not exported.empty
        else estimate_cost(context, trial.params)["mmacs"]
    )
    source = study
    if single_from is not None:
        other_cfg, source = load_study(single_from)
        if setup_fingerprint(other_cfg, data.fingerprint) != context.setup():
            raise ConfigError(
                f"--single-from {single_from}: its data, model, teachers or export budget differ from "
                f"{study_folder}'s, so its nets would not be trained like this study's rows. Use a study made "
                "from the same space file apart from its search dimensions."
            )
    single_trial = best_single(trials_table(source), mmacs)
    single_params = None
    if single_trial is not None:
        single = next(t for t in source.trials if t.number == single_trial)
        single_params = TrialRecord.of(single).parameters(single.params)
    return _Setup(
        cfg=cfg,
        ctx=context,
        params=TrialRecord.of(trial).parameters(trial.params),
        single_trial=single_trial,
        single_params=single_params,
        single_from=single_from,
        configs={
            t.number: TrialRecord.of(t).parameters(t.params)
            for t in study.trials
            if t.state == TrialState.COMPLETE
        },
    )


def _names(
    study_folder: Path, trial_number: int, also: tuple[int, ...] = (), single_from: Path | None = None
) -> list[str]:
    """The rows of the report, in its order (compressed rows, then the control). A trial that is already a
    row (the exported one, the best single) is not run twice."""
    setup = _setup(study_folder, trial_number, single_from)
    names = [MOE]
    for number in also:
        if number not in setup.configs:
            raise ConfigError(f"--also {number}: no such completed trial in {study_folder}.")
        if number not in (trial_number, setup.single_trial) and f"trial {number}" not in names:
            names.append(f"trial {number}")
    if setup.single_params is not None and (single_from is not None or setup.single_trial != trial_number):
        names.append(SINGLE)
    names.append(CONTROL)
    return names


def _longest_first(tasks: list[tuple[str, int]], cfg) -> list[tuple[str, int]]:
    """``tasks`` ordered by their training epochs, most first, so that parallel workers finish together
    (largest-first scheduling): the control trains the teacher's recipe (80 epochs on the defaults, 33 min
    a core) and a compressed row the ``export:`` budget's stages (41 epochs, 22 min). On 5 such pairs and
    2 workers: 78 minutes instead of 88 with the compressed rows first."""

    def epochs(task: tuple[str, int]) -> float:
        if task[0] == CONTROL:
            return cfg.baseline.epochs
        budget = cfg.export
        return budget.finetune_epochs + budget.moe_epochs + budget.gate_epochs + budget.qat_epochs

    return sorted(tasks, key=epochs, reverse=True)  # stable: rows keep their seed order


@functools.cache
def _control_width(study_folder: Path, trial_number: int, single_from: Path | None = None) -> float:
    """The control's width: its MACs match the exported configuration's, computed from shapes (prune +
    speedup, no training), so the control does not wait for the exported row's training."""
    setup = _setup(study_folder, trial_number, single_from)
    target = estimate_cost(setup.ctx, setup.params)["mmacs"] * 1e6
    return _width_for_macs(setup.cfg.model.spec, setup.ctx.data, target)


def _identity(study_folder: Path, trial_number: int, name: str, single_from: Path | None = None) -> object:
    """What a row's result depends on besides its seed: the configuration, or the control's width."""
    setup = _setup(study_folder, trial_number, single_from)
    if name == MOE:
        return setup.params
    if name == SINGLE:
        return setup.single_params
    if name == CONTROL:
        return _control_width(study_folder, trial_number, single_from)
    return setup.configs[int(name.split()[1])]


def _reusable(
    saved: list[dict], tasks: list[tuple[str, int]], identity: dict[str, object], fingerprint: str
) -> list[dict]:
    """The entries of an earlier run (``REPORT.seeds.json``) that answer one of ``tasks``: same row, same
    seed, same setup (:meth:`search.evaluation.TrialContext.setup`), and the same configuration (compressed rows) or control width.
    Nothing else is trusted."""
    kept = []
    for entry in saved if isinstance(saved, list) else []:
        if not isinstance(entry, dict):  # another format (an older version's per-seed file): not trusted
            continue
        key = (entry.get("row"), entry.get("seed"))
        same = entry.get("setup") == fingerprint and entry.get("params", entry.get("width")) == identity.get(
            key[0]
        )
        if key in tasks and same and key not in [(e["row"], e["seed"]) for e in kept]:
            kept.append(entry)
    return kept


def _row(
    study_folder: Path, trial_number: int, name: str, seed: int, threads: int, single_from: Path | None = None
) -> dict:
    """One row of the experiment for one seed (runs in a worker process with ``--jobs``)."""
    setup = _setup(study_folder, trial_number, single_from)
    ctx = setup.ctx
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if name == CONTROL:
            width = _control_width(study_folder, trial_number, single_from)
            result = _control_row(setup.cfg, ctx.data, width, seed, scratch, threads)
        else:
            params = _identity(study_folder, trial_number, name, single_from)
            result = _compressed_row(ctx, params, seed, scratch / "row", threads, f"{name}, seed {seed}")
    return {**result, "seconds": time.time() - started}  # wall-clock of this (row, seed), training included


def _merge(
    done: list[dict], seeds: list[int], names: list[str], single_is: int | None = None
) -> dict[str, dict]:
    """Rows over seeds (``done``: one entry per finished (row, seed)), in the order of ``names``:
    accuracies and latencies listed in seed order, the rest from the first seed. ``single_is``: the
    exported trial, when it is also the best single model (its row stands for both)."""
    merged: dict[str, dict] = {}
    for name in names:
        runs = sorted((entry for entry in done if entry["row"] == name), key=lambda e: seeds.index(e["seed"]))
        if not runs:
            continue
        row = {key: value for key, value in runs[0].items() if key not in ("row", "seed")}
        row["seconds"] = [  # trained seeds only: a seed measured from an export candidate took a minute
            entry["seconds"]
            for entry in runs
            if entry.get("seconds") is not None
            and entry.get("from", "trained in this run") == "trained in this run"
        ]
        routed = next((entry for entry in runs if entry.get("routing_per_class")), None)
        if routed is not None:  # seeds saved by an older version hold no routing table
            row["routing_per_class"], row["routing_seed"] = routed["routing_per_class"], routed["seed"]
        for key in ("test", "test_one_view", "val", "torch_test", "latency_ms"):
            if key in row:
                row[key] = [value for entry in runs for value in entry[key]]
        merged[name] = row
    if SINGLE not in merged and single_is is not None and MOE in merged:
        merged[SINGLE] = {**merged[MOE], "note": f"= the exported trial {single_is}"}
        if CONTROL in merged:  # keep the control last
            merged[CONTROL] = merged.pop(CONTROL)
    return merged


def run(
    study_folder: Path,
    trial_number: int,
    seeds: list[int],
    out: Path,
    threads: int = 1,
    jobs: int = 1,
    also: tuple[int, ...] = (),
    report_only: bool = False,
    single_from: Path | None = None,
) -> Path:
    """Every row for every seed, then the report. ``jobs`` > 1 runs (row, seed) pairs in that many processes,
    each pinned to its own share of the CPUs (latency is measured at ``threads`` threads inside that share).
    ``also``: more trials re-run as rows. (row, seed) pairs already in ``<out>.seeds.json`` with the same
    configuration are reused, so an interrupted or extended experiment resumes. ``report_only``: write the
    report from the saved pairs alone, run nothing; each row says how many of the seeds it holds."""
    started = time.time()
    study_folder = Path(study_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".seeds.json")

    def keep(rows: dict) -> dict:  # nothing computed is lost if a later seed or the report fails
        rows["setup"] = fingerprint  # what a later run checks before reusing it (_reusable)
        done.append(rows)
        staging = partial.with_suffix(".tmp")  # written whole, then renamed: a kill never leaves half a file
        staging.write_text(json.dumps(done, indent=1, default=str))
        staging.replace(partial)
        return rows

    single_from = Path(single_from) if single_from is not None else None
    setup = _setup(study_folder, trial_number, single_from)
    names = _names(study_folder, trial_number, tuple(also), single_from)
    tasks = _longest_first([(name, seed) for name in names for seed in seeds], setup.cfg)
    try:
        saved = json.loads(partial.read_text()) if partial.exists() else []
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{partial}: not readable JSON ({error}); it holds the results an earlier run saved. Move it away "
            "to start the experiment over."
        ) from error
    identity = {name: _identity(study_folder, trial_number, name, single_from) for name in names}
    fingerprint = setup.ctx.setup()
    done: list[dict] = _reusable(saved, tasks, identity, fingerprint)
    reused = len(done)
    tasks = [task for task in tasks if task not in [(entry["row"], entry["seed"]) for entry in done]]
    missing, tasks = (tasks, []) if report_only else ([], tasks)
    if report_only and not done:
        raise ConfigError(f"--report-only: {partial} holds no finished (row, seed) of this experiment yet.")
    if any(name != CONTROL for name, _ in tasks):  # here, once: the row processes load the kept targets
        setup.ctx.training_data(setup.cfg.export)
    units = Units("experiment", len(tasks), "(row, seed)")

    def finished(job: tuple, result: dict) -> None:
        keep({"row": job[2], "seed": job[3], **result})
        units.finished(f"{job[2]} seed {job[3]}: test {result['test'][0]:.4f} ({result['seconds']:.0f} s)")

    try:
        run_pinned(
            _row,
            [(study_folder, trial_number, name, seed, threads, single_from) for name, seed in tasks],
            jobs,
            finished,
        )
    finally:
        units.close()
    same = single_from is None and setup.single_trial == trial_number
    rows = _merge(done, seeds, names, trial_number if same else None)
    if SINGLE in rows and setup.single_trial is not None and not same:
        origin = f" of {single_from}" if single_from is not None else ""
        rows[SINGLE]["source"] = f"trial {setup.single_trial}{origin}"

    return write_report(
        ExperimentRun(
            study_folder=study_folder,
            trial_number=trial_number,
            seeds=tuple(seeds),
            threads=threads,
            jobs=jobs,
            also=tuple(also),
            single_from=single_from,
            started=started,
            partial=partial,
            reused=reused,
            missing=tuple(missing),
            done=tuple(done),
            class_names=tuple(setup.ctx.data.class_names),
        ),
        rows,
        out,
    )
