"""Several processes on one study: each is spawned, opens the study from the shared storage and runs the
search loop; the parent shows their trials' progress and reports a worker that failed.

Each worker seeds its sampler differently (:func:`worker_config`): with one seed every worker's sampler
proposes the same configuration at the same moment, and each would be trained twice.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import optuna
from optuna.trial import TrialState

from pipelines.errors import CompressionError
from search.config import SearchConfig

__all__ = ["worker_config", "quiet_warnings", "run_workers"]


def worker_config(cfg: SearchConfig, index: int) -> SearchConfig:
    """The configuration of worker ``index`` of one study: its sampler seeded with ``study.sampler.seed +
    index`` (worker 0 keeps the seed, so a one-worker study is unchanged)."""
    sampler = cfg.study.sampler
    if sampler.seed is None or index == 0:
        return cfg
    return replace(cfg, study=replace(cfg.study, sampler=replace(sampler, seed=sampler.seed + index)))


def quiet_warnings() -> None:
    """Warnings that say nothing to a user, in this process (spawned workers call it too): Optuna's
    heartbeat and constraint features are stable in practice, and the enqueued reference trial is outside
    the space's ranges on purpose."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")


def run_workers(
    entry: Callable[..., None],
    arguments: list[tuple],
    study: optuna.Study,
    progress: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> None:
    """Spawn one process per ``arguments`` entry running ``entry(*arguments)`` (a module-level function,
    pickled by name) and call ``progress`` once per trial they finish. Raises CompressionError when a
    worker exits with an error; Ctrl-C terminates them all."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=entry, args=args, daemon=False) for args in arguments]
    for process in processes:
        process.start()
    seen: set[int] = set()

    def report() -> None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if trial.number not in seen:
                seen.add(trial.number)
                progress(study, trial)

    try:
        while any(process.is_alive() for process in processes):
            report()
            time.sleep(1)
    except KeyboardInterrupt:
        for process in processes:
            process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
    report()
    failed = [process.exitcode for process in processes if process.exitcode not in (0, None)]
    if failed:
        raise CompressionError(
            f"{len(failed)} worker process(es) exited with errors {failed}; see their output above."
        )


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` processes gets an equal share of this machine's CPUs (at least one)."""
    return max(1, (os.cpu_count() or 1) // workers)
