"""A study: its sampler, opening and resuming it, and the search loop that runs its trials.

All of it is Optuna's; this module only wires it. Re-running the same command loads the study and runs only
the trials still missing; a changed space, model, dataset or budget under the same study name is refused
(their trials would be scored differently). Storage is :mod:`search.storage`, stop rules
:mod:`search.stopping`, worker processes :mod:`search.workers`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from pipelines.errors import CompressionError, ConfigError
from pipelines.reference_accuracy import reference_warning
from search.config import SearchConfig, dump_config, load_config, parse_config
from search.evaluation import TrialContext
from search.latency import check_engine, study_block_time, study_reference
from search.objective import DIRECTIONS, OBJECTIVES, Objective, is_repeat, reference_missing
from search.progress import Progress, configure_worker_logging
from search.record import TrialRecord
from search.samplers import sampler_class, sampler_options
from search.setup import load_data, resolve_augment, trial_context
from search.space import baseline_params
from search.stopping import stop_rules
from search.storage import default_storage, make_storage
from search.workers import quiet_warnings, run_workers, threads_per_worker, worker_config
from search.workspace import study_dir

__all__ = [
    "make_sampler",
    "open_study",
    "load_study",
    "completed_trials",
    "evaluated_trials",
    "run_search",
    "run_trials",
]

log = logging.getLogger("hycomp")


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler (its name, seed and options were checked when the configuration was parsed)."""
    settings = cfg.study.sampler
    options = sampler_options(settings.name, settings.options)
    return sampler_class(settings.name)(seed=settings.seed, **options)


def open_study(cfg: SearchConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study or load it when it exists (same name, same storage)."""
    study = optuna.create_study(
        study_name=cfg.study.name,
        storage=storage,
        sampler=make_sampler(cfg),
        directions=list(DIRECTIONS),
        load_if_exists=True,
    )
    if study.metric_names is None:
        study.set_metric_names(list(OBJECTIVES))
    return study


def load_study(folder: Path, storage_url: str | None = None) -> tuple[SearchConfig, optuna.Study]:
    """Open the study of an existing results folder (its config.yaml says which storage)."""
    cfg = load_config(folder / "config.yaml", source="study folder")
    url = storage_url or cfg.study.storage or default_storage(folder)
    if url == default_storage(folder) and not (folder / "study.db").exists():
        raise ConfigError(
            f"{folder}: no study.db here. If the search ran with --storage URL, pass the same --storage URL "
            "to this command; otherwise run `hycomp search` first."
        )
    try:
        study = optuna.load_study(
            study_name=cfg.study.name, storage=make_storage(url), sampler=make_sampler(cfg)
        )
    except KeyError:
        raise ConfigError(
            f"study {cfg.study.name!r} not found in storage {url}. Run `hycomp search` first."
        ) from None
    return cfg, study


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def evaluated_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials that evaluated a new configuration: what ``study.trials`` counts.

    Samplers revisit points of a discrete space (TPE proposed 4-5 repeats in 20 trials in the sampler
    benchmark); a repeat costs milliseconds and does not use up the budget of the search.
    """
    return [trial for trial in completed_trials(study) if not is_repeat(trial)]


def _write_config(cfg: SearchConfig, folder: Path, probe: dict | None = None) -> None:
    """Write the study's resolved config (``augment: auto`` replaced by the probe's choice, whose numbers
    head the file as comments), refusing a study folder whose trials were scored under another setup."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    text = dump_config(cfg)
    if probe is not None:
        text = f"# {probe['summary']}\n" + text
    if path.exists() and path.read_text() != text:
        previous = load_config(path, source="study folder")
        # What its finished trials were scored under: mixing them with trials scored differently (another
        # teacher, another per-trial budget) would rank incomparable numbers on one front.
        changed = [
            name
            for name, before, now in (
                ("space", previous.space, cfg.space),
                ("model", previous.model, cfg.model),
                ("data.dataset", previous.data.dataset, cfg.data.dataset),
                ("baseline", previous.baseline, cfg.baseline),
                ("trial", previous.trial, cfg.trial),
            )
            if before != now
        ]
        if changed:
            raise ConfigError(
                f"study.name: a study named {cfg.study.name!r} already exists in {folder} with a different "
                f"{', '.join(changed)}. Pick another study.name, or delete that folder to start over."
            )
    path.write_text(text)


def run_search(
    cfg: SearchConfig,
    *,
    storage_url: str | None = None,
    results: Path | None = None,
    show_progress: bool = True,
    workers: int = 1,
) -> optuna.Study:
    """Run (or resume) the study until ``cfg.study.trials`` trials are complete.

    ``workers > 1`` starts that many processes on the same study (the storage is the only thing they
    share); the number of completed trials is exact: a worker that would start a trial beyond the target
    stops instead.
    """
    if workers < 1:
        raise ConfigError(f"--workers: {workers} must be >= 1.")
    check_engine(cfg.measure.engine)  # before any work: an engine this machine lacks is named now
    folder = study_dir(cfg.study.name, results)
    data = load_data(cfg)
    cfg, probe = resolve_augment(
        cfg, data, results
    )  # workers, export and experiment read the resolved config
    url = storage_url or cfg.study.storage or default_storage(folder)
    storage = make_storage(url)
    _write_config(cfg, folder, probe)
    study = open_study(cfg, storage)
    # --workers N trains missing teachers N at a time too, before the workers start
    context, record = trial_context(cfg, data, folder, jobs=workers)
    # Computed (or checked) here, once: the workers load the kept file instead of each computing it.
    context.training_data(cfg.trial)
    study.set_user_attr("baseline", record)
    log.info(
        "baseline %s: val %.4f, test %.4f, %.2f MMACs, %d params",
        record["arch"],
        record["val_accuracy"],
        record["test_accuracy"],
        record["macs"] / 1e6,
        record["params"],
    )
    warning = reference_warning(data.name, record["test_accuracy"], data.image_size)
    if warning:
        log.warning(warning)
    # Teachers ready, no trial running yet: the machine is as quiet as this study will see it. The engine
    # and the teacher's latency are chosen once and stored; workers and resumed runs read them.
    context.latency = study_reference(cfg, data, context.teacher, folder, study)
    study_block_time(cfg, data, context.teacher, folder, context.latency)
    if cfg.study.enqueue_baseline and reference_missing(study):
        # A new study, or one whose reference was interrupted: queued again (the interrupted one has the
        # same parameters, so skip_if_exists, which lets machines started together enqueue it once, is
        # only for a new study).
        study.enqueue_trial(
            baseline_params(cfg.space),
            user_attrs=TrialRecord(reference="baseline (no pruning, fp32, 1 expert)").user_attrs(),
            skip_if_exists=not study.trials,
        )
    done = len(evaluated_trials(study))
    if done >= cfg.study.trials:
        log.info("study %s already has %d completed trials; nothing to do", cfg.study.name, done)
        return study
    progress = Progress(cfg.study.trials, done, enabled=show_progress)
    try:
        if workers == 1:
            run_trials(context, study, progress)
        else:
            threads = threads_per_worker(workers)
            arguments = [
                (
                    cfg.to_dict(),
                    url,
                    str(results) if results else None,
                    threads,
                    index,
                    log.getEffectiveLevel(),
                )
                for index in range(workers)
            ]
            run_workers(_worker_main, arguments, study, progress)
    finally:
        progress.close()
    return study


def run_trials(context: TrialContext, study: optuna.Study, progress=None) -> None:
    """The search loop of one process: one trial at a time until the study holds ``study.trials``
    evaluated trials or a stop rule (:mod:`search.stopping`) ends it."""
    cfg = context.cfg
    objective = Objective(context, target_trials=cfg.study.trials)
    rules = stop_rules(cfg.study.trials, cfg.study.timeout_minutes)
    callbacks = ([progress] if progress is not None else []) + rules
    while len(evaluated_trials(study)) < cfg.study.trials:
        if any(rule.stopped for rule in rules):
            return
        if _active_count(study) >= cfg.study.trials:
            # Other workers hold the remaining trials; wait for them (or for Optuna to fail stale ones).
            optuna.storages.fail_stale_trials(study)
            time.sleep(2)
            continue
        study.optimize(objective, n_trials=1, catch=(CompressionError,), callbacks=callbacks)


def _active_count(study: optuna.Study) -> int:
    """Trials that count toward the target or may: evaluated ones and running ones."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(evaluated_trials(study)) + len(running)


def _worker_main(
    cfg_dict: dict, url: str, results: str | None, threads: int, index: int = 0, level: int = logging.WARNING
) -> None:
    """Entry point of a spawned worker process: same study, same cached teachers and targets, its own
    sampler seed (:func:`search.workers.worker_config`); its trials' stage lines logged at ``level``."""
    torch.set_num_threads(threads)
    configure_worker_logging(level)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are logged once, by the objective
    quiet_warnings()
    cfg = worker_config(parse_config(cfg_dict), index)
    results_path = Path(results) if results else None
    data = load_data(cfg)
    study = open_study(cfg, make_storage(url))
    folder = study_dir(cfg.study.name, results_path)
    context, _ = trial_context(cfg, data, folder)
    context.latency = study_reference(cfg, data, context.teacher, folder, study)  # stored by the parent
    run_trials(context, study)
