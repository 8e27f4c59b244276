"""Studies: storage, samplers, resume and the search loop. All of it is Optuna's; this module only wires it.

- Storage: SQLite at results/<study>/study.db by default; any Optuna RDB URL (postgresql://…, mysql://…)
  with ``--storage``; a path ending in ``.log`` / ``.journal`` selects Optuna's JournalStorage file backend
  (safe for several processes on one machine). RDB storages run Optuna's heartbeat, so a trial whose
  process was killed (SIGKILL) is marked failed and its configuration retried by
  ``RetryHeartbeatStaleTrialCallback``.
- Resume: re-running the same command loads the study and runs only the trials still missing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from pipelines.errors import CompressionError, ConfigError, unknown_name
from search.objective import REJECTED, is_repeat, reference_missing
from search.record import TrialRecord
from search.space import SAMPLERS, SearchConfig, baseline_params, dump_space, load_space
from search.workspace import study_dir

__all__ = [
    "default_storage",
    "make_storage",
    "make_sampler",
    "worker_config",
    "quiet_warnings",
    "open_study",
    "load_study",
    "completed_trials",
    "evaluated_trials",
    "run_search",
]

log = logging.getLogger("hycomp")

# A killed worker's trial is noticed once its heartbeat is GRACE seconds old (env overrides for tests).
HEARTBEAT_SECONDS = int(os.environ.get("HYCOMP_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = int(os.environ.get("HYCOMP_GRACE_SECONDS", "60"))
# A search stops when the sampler has proposed this many (or 2 x trials) already-evaluated configurations.
MAX_REPEATS = 20
# A search stops when this many sampled configurations in a row break a MACs / size budget before training.
MAX_REJECTIONS = 25


def default_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').as_posix()}"


def _driver_url(url: str) -> str:
    """A bare ``postgresql://`` URL means psycopg 3 to SQLAlchemy >= 2.1; use psycopg2 when only it is here."""
    has = importlib.util.find_spec
    if url.startswith("postgresql://") and has("psycopg") is None and has("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def _open_rdb(url: str, engine_kwargs: dict, attempts: int = 6) -> RDBStorage:
    """RDBStorage, retried when machines started together race to create the tables of a fresh database.

    Optuna's CREATE TABLE is not atomic across processes: the loser of the race gets an IntegrityError or
    ProgrammingError (PostgreSQL: UniqueViolation on pg_type). After the winner commits, opening succeeds.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    def open_once() -> RDBStorage:
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs=engine_kwargs,
        )

    for attempt in range(attempts - 1):
        try:
            return open_once()
        except (IntegrityError, ProgrammingError, OperationalError) as error:
            if isinstance(error, OperationalError) and "locked" not in str(error):
                raise  # a real connection problem, not a race: report it at once
            time.sleep(0.2 * (attempt + 1) + random.uniform(0, 0.3))
    return open_once()


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; raises ConfigError with the fix when it cannot be opened."""
    try:
        if url.endswith((".log", ".journal")) and "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            # several worker processes may write at once: wait for SQLite's lock instead of failing
            engine_kwargs["connect_args"] = {"timeout": 120}
        return _open_rdb(_driver_url(url), engine_kwargs)
    except Exception as error:  # sqlalchemy / driver errors have many types
        raise ConfigError(
            f"--storage: cannot open {url!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "Check the URL, that the server is running and reachable, and that its driver is installed "
            "(PostgreSQL: pip install psycopg2-binary, or name the driver: postgresql+psycopg2://...; "
            "MySQL: pip install pymysql and use mysql+pymysql://...)."
        ) from None


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    settings = cfg.study.sampler
    classes = {
        "tpe": optuna.samplers.TPESampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "gp": optuna.samplers.GPSampler,
        "random": optuna.samplers.RandomSampler,
    }
    if settings.name not in classes:
        raise unknown_name("study.sampler.name", settings.name, SAMPLERS)
    try:
        return classes[settings.name](seed=settings.seed, **settings.options)
    except TypeError as error:
        raise ConfigError(
            f"study.sampler.options: {settings.options} rejected by {classes[settings.name].__name__}: {error}"
        ) from None


def open_study(cfg: SearchConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study or load it when it exists (same name, same storage)."""
    from search.objective import DIRECTIONS, OBJECTIVES

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
    cfg = load_space(folder / "config.yaml")
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


def _write_config(cfg: SearchConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    text = dump_space(cfg)
    if path.exists() and path.read_text() != text:
        previous = load_space(path)
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


def load_data(cfg: SearchConfig):
    """The dataset a search config names, loaded with its data settings."""
    from pipelines.data import load_dataset

    return load_dataset(
        cfg.data.dataset,
        cfg.data.root,
        size=cfg.data.size,
        download=cfg.data.download,
        verify_md5=cfg.data.verify_md5,
    )


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
    from search.baseline import get_teachers

    if workers < 1:
        raise ConfigError(f"--workers: {workers} must be >= 1.")
    folder = study_dir(cfg.study.name, results)
    data = load_data(cfg)
    url = storage_url or cfg.study.storage or default_storage(folder)
    storage = make_storage(url)
    _write_config(cfg, folder)
    study = open_study(cfg, storage)
    # --workers N trains missing teachers N at a time too, before the workers start
    teachers, record = get_teachers(cfg, data, results, threads=cfg.measure.latency_threads, jobs=workers)
    study.set_user_attr("baseline", record)
    log.info(
        "baseline %s: val %.4f, test %.4f, %.2f MMACs, %d params",
        record["arch"],
        record["val_accuracy"],
        record["test_accuracy"],
        record["macs"] / 1e6,
        record["params"],
    )
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
    progress = _Progress(cfg.study.trials, done, enabled=show_progress)
    try:
        if workers == 1:
            _worker_loop(cfg, study, data, teachers, folder, progress)
        else:
            _run_workers(cfg, url, results, workers, study, progress)
    finally:
        progress.close()
    return study


def _worker_loop(cfg: SearchConfig, study: optuna.Study, data, teachers, folder: Path, progress) -> None:
    from search.evaluation import TrialContext
    from search.objective import Objective

    context = TrialContext(cfg, data, teachers[0], folder, distill_from=teachers)
    objective = Objective(context, target_trials=cfg.study.trials)
    deadline = None if cfg.study.timeout_minutes is None else time.time() + 60 * cfg.study.timeout_minutes
    while len(evaluated_trials(study)) < cfg.study.trials:
        if deadline is not None and time.time() > deadline:
            log.info("timeout reached after %s minutes", cfg.study.timeout_minutes)
            return
        repeats = sum(is_repeat(trial) for trial in completed_trials(study))
        if repeats >= max(MAX_REPEATS, 2 * cfg.study.trials):
            log.warning(
                "the sampler proposed already-evaluated configurations %d times: the space has few new points "
                "left. Stopping with %d evaluated; widen `space:` to search further.",
                repeats,
                len(evaluated_trials(study)),
            )
            return
        if _active_count(study) >= cfg.study.trials:
            # Other workers hold the remaining trials; wait for them (or for Optuna to fail stale ones).
            optuna.storages.fail_stale_trials(study)
            time.sleep(2)
            continue
        study.optimize(objective, n_trials=1, catch=(CompressionError,), callbacks=[progress])
        rejected = _rejected_in_a_row(study)
        if len(rejected) >= MAX_REJECTIONS:
            raise ConfigError(
                f"constraints: the last {len(rejected)} sampled configurations were all rejected before training "
                f"(latest: {rejected[-1]}). The budget is below what this space reaches: raise the limit "
                "(--max-mmacs / --max-size-kb or the constraints: section) or allow higher sparsity / fewer bits "
                "in space:."
            )
        if _too_many_failures(study):
            raise CompressionError(
                "the last 5 trials all failed; stopping. `hycomp front` lists their reasons."
            )


def _active_count(study: optuna.Study) -> int:
    """Trials that count toward the target or may: evaluated ones and running ones."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(evaluated_trials(study)) + len(running)


def worker_config(cfg: SearchConfig, index: int) -> SearchConfig:
    """The configuration of worker ``index`` of one study: its sampler seeded with ``study.sampler.seed +
    index`` (worker 0 keeps the seed, so a one-worker study is unchanged). With one seed every worker's
    sampler proposes the same configuration at the same moment, and each is trained twice."""
    sampler = cfg.study.sampler
    if sampler.seed is None or index == 0:
        return cfg
    return replace(cfg, study=replace(cfg.study, sampler=replace(sampler, seed=sampler.seed + index)))


def quiet_warnings() -> None:
    """Warnings that say nothing to a user, in this process (spawned workers call it too): Optuna's
    heartbeat and constraint features are stable in practice, and the enqueued reference trial is outside
    the space's ranges on purpose."""
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")


def _worker_main(cfg_dict: dict, url: str, results: str | None, threads: int, index: int = 0) -> None:
    """Entry point of a worker process (spawned): same study, same cached teacher. Worker ``index`` seeds
    its sampler with ``study.sampler.seed + index``: with one seed, the workers would propose the same
    configurations at the same moment and train each twice."""
    import torch

    from search.baseline import get_teachers
    from search.space import parse_space

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are logged once, by the objective
    quiet_warnings()
    cfg = worker_config(parse_space(cfg_dict), index)
    results_path = Path(results) if results else None
    data = load_data(cfg)
    study = open_study(cfg, make_storage(url))
    teachers, _ = get_teachers(cfg, data, results_path, threads=cfg.measure.latency_threads)
    _worker_loop(cfg, study, data, teachers, study_dir(cfg.study.name, results_path), lambda *args: None)


def _run_workers(cfg: SearchConfig, url: str, results: Path | None, workers: int, study, progress) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    processes = [
        context.Process(
            target=_worker_main,
            args=(cfg.to_dict(), url, str(results) if results else None, threads, index),
            daemon=False,
        )
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    seen: set[int] = set()
    try:
        while any(process.is_alive() for process in processes):
            for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
                if trial.number not in seen:
                    seen.add(trial.number)
                    progress(study, trial)
            time.sleep(1)
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if trial.number not in seen:
            progress(study, trial)
    failed = [process.exitcode for process in processes if process.exitcode not in (0, None)]
    if failed:
        raise CompressionError(
            f"{len(failed)} worker process(es) exited with errors {failed}; see their output above."
        )


def _rejected_in_a_row(study: optuna.Study) -> list[str]:
    """Reasons of the trailing run of trials rejected before training by a budget (surplus trials skipped)."""
    reasons: list[str] = []
    for trial in reversed(study.get_trials(deepcopy=False)):
        reason = TrialRecord.of(trial).fail_reason
        if trial.state == TrialState.PRUNED and reason.startswith(REJECTED):
            reasons.append(reason)
        elif trial.state == TrialState.PRUNED or trial.state == TrialState.RUNNING:
            continue  # a surplus trial of a parallel worker, or one still running elsewhere
        else:
            break
    return reasons[::-1]


def _too_many_failures(study: optuna.Study, window: int = 5) -> bool:
    finished = [trial for trial in study.trials if trial.state in (TrialState.COMPLETE, TrialState.FAIL)]
    return len(finished) >= window and all(trial.state == TrialState.FAIL for trial in finished[-window:])


class _Progress:
    """A tqdm bar over completed trials with ETA, plus a one-line summary per trial."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total, initial=done, unit="trial", desc="search", disable=not enabled, dynamic_ncols=True
        )
        self._tqdm = tqdm

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(trial)
        if trial.state == TrialState.COMPLETE and record.is_repeat:
            self._tqdm.write(
                f"trial {trial.number}: same configuration as trial {record.repeat_of}; result reused (not counted)"
            )
        elif trial.state == TrialState.COMPLETE:
            self._bar.update(1)
            accuracy, mmacs, latency = trial.values
            stages = ", ".join(f"{key} {value:.0f}s" for key, value in record.seconds.items())
            self._tqdm.write(
                f"trial {trial.number}: val {accuracy:.4f}  {mmacs:.2f} MMACs  {latency:.3f} ms  "
                f"[{_describe(record.parameters(trial.params))}]  ({stages})"
            )
        else:
            reason = record.fail_reason or trial.state.name
            self._tqdm.write(f"trial {trial.number}: {trial.state.name} - {reason}")

    def close(self) -> None:
        self._bar.close()


def _describe(config: dict) -> str:
    text = (
        f"{config.get('pruner')} {config.get('sparsity', 0):.2f}, {config.get('bits')}-bit, "
        f"{config.get('num_experts')} expert(s) top-{config.get('effective_top_k', config.get('top_k'))}, gate {config.get('gate_size')}"
    )
    if config.get("num_experts", 1) > 1:
        text += f", {config.get('routing', 'class-groups')} routing, experts from {config.get('expert_init', 'copies')}"
    return text
