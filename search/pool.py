"""Run independent jobs (full-budget trainings) in parallel processes, each pinned to its own CPUs.

Used by the quality experiment (rows x seeds) and by ``hycomp export --candidates`` (candidates retrained
at the full budget). With 2 cores, two single-threaded trainings finish sooner than one at two threads:
small-batch training of these nets gains little from a second thread.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import torch

from search.progress import configure_worker_logging

__all__ = ["run_pinned"]


def _exit_with(parent: int) -> None:
    """Stop this worker when the process that started it is gone: a killed experiment must not leave
    orphans training for an hour and slowing whatever runs next."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def _pin(cpus: multiprocessing.Queue, parent: int, level: int) -> None:
    """Worker initializer: one share of the CPUs per worker, its torch threads to match; the worker ends
    with the process ``parent`` that started it and logs its progress lines at ``level`` (the parent's)."""
    configure_worker_logging(level)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    mine = cpus.get()
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    import warnings

    warnings.filterwarnings("ignore")


def run_pinned(
    function: Callable,
    jobs: Sequence[tuple],
    workers: int,
    on_result: Callable[[tuple, object], None],
) -> None:
    """``function(*job)`` for every job, in ``workers`` processes (inline when 1), each pinned to its share
    of this process's CPUs. ``on_result(job, result)`` runs here as each job finishes, so what finished is
    kept even when a later job fails; a failure is re-raised after the others are done. ``function`` must be
    importable by name (workers are spawned)."""
    workers = min(workers, len(jobs))
    if workers <= 1:
        for job in jobs:
            on_result(job, function(*job))
        return
    cpus = sorted(os.sched_getaffinity(0))
    shares = [set(cpus[i::workers]) or set(cpus) for i in range(workers)]  # fewer CPUs than workers: share
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for share in shares:
        queue.put(share)
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_pin,
        initargs=(queue, os.getpid(), logging.getLogger("hycomp").getEffectiveLevel()),
    ) as pool:
        futures = {pool.submit(function, *job): job for job in jobs}
        for future in futures:
            future.add_done_callback(lambda f: f.exception() is None and on_result(futures[f], f.result()))
        for future in futures:
            future.result()  # re-raises a failed job here (the finished ones are already kept)
