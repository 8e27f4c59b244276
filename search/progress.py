"""What the user sees while hycomp works: the search's trial bar, and the progress of every other step that
takes more than a few seconds (teacher epochs, candidates, the experiment's units).

A terminal gets a tqdm bar; anything else (CI, a log file) one line per finished unit on the "hycomp"
logger. ``--quiet`` raises that logger to WARNING, which silences both. Spawned processes (search workers,
pinned jobs) log lines, never bars, at the level of the process that started them
(:func:`configure_worker_logging`).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time

import optuna
from optuna.trial import TrialState

from pipelines.hybrid import DEFAULT_EXPERT_INIT
from pipelines.moe import DEFAULT_ROUTING
from search.record import TrialRecord

__all__ = ["Progress", "Units", "progress_shown", "bars_shown", "configure_worker_logging"]

log = logging.getLogger("hycomp")


def progress_shown() -> bool:
    """False under ``--quiet`` (the "hycomp" logger at WARNING or above)."""
    return log.isEnabledFor(logging.INFO)


def bars_shown() -> bool:
    """Whether progress is a bar: shown, on a terminal, in the main process (workers log lines)."""
    return progress_shown() and multiprocessing.parent_process() is None and sys.stderr.isatty()


def configure_worker_logging(level: int) -> None:
    """In a spawned process: "hycomp" lines to stderr at ``level`` (the parent's), everything else at
    WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(level)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Units:
    """Progress over ``total`` units of one step (epochs of a teacher, candidates, (row, seed) pairs): a
    tqdm bar on a terminal, else one line per finished unit with the time per unit and the ETA."""

    def __init__(self, name: str, total: int, unit: str, done: int = 0) -> None:
        self.name, self.total, self.unit, self.done = name, total, unit, done
        self._started, self._first = time.perf_counter(), done
        self._bar = None
        if bars_shown():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done, unit=unit, desc=name, dynamic_ncols=True, leave=False)

    def eta(self) -> float | None:
        """Seconds left at the pace of the units finished so far (None before the first)."""
        finished = self.done - self._first
        if finished <= 0:
            return None
        return (time.perf_counter() - self._started) / finished * max(0, self.total - self.done)

    def finished(self, text: str = "", done: int | None = None) -> None:
        """One more unit (or ``done`` in all) finished; ``text`` says what it reached."""
        previous, self.done = self.done, self.done + 1 if done is None else done
        if self._bar is not None:
            self._bar.update(self.done - previous)
            if text:
                self._bar.set_postfix_str(text, refresh=True)
            return
        eta = self.eta()
        log.info(
            "%s: %s %d/%d%s%s",
            self.name,
            self.unit,
            self.done,
            self.total,
            f", {text}" if text else "",
            f", ETA {_duration(eta)}" if eta is not None and self.done < self.total else "",
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Progress:
    """A tqdm bar over completed trials with ETA, plus a one-line summary per trial."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=done,
            unit="trial",
            desc="search",
            disable=not (enabled and bars_shown()),
            dynamic_ncols=True,
        )
        self._tqdm = tqdm

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(trial)
        if trial.state == TrialState.COMPLETE and not record.is_repeat:
            self._bar.update(1)
        if not progress_shown():
            return
        if trial.state == TrialState.COMPLETE and record.is_repeat:
            self._tqdm.write(
                f"trial {trial.number}: same configuration as trial {record.repeat_of}; result reused (not counted)"
            )
        elif trial.state == TrialState.COMPLETE:
            accuracy, mmacs, latency = trial.values
            stages = ", ".join(f"{key} {value:.0f}s" for key, value in record.seconds.items())
            share = record.measurement.file_routing_share
            routing = f" (gate + routing {share:.0%})" if share is not None else ""
            per_mac = record.measurement.latency_per_mac
            if per_mac is not None:
                routing += f" (x{record.measurement.batch_latency_ratio:.2f} teacher at batch "
                routing += f"{record.measurement.batch_latency['batch']}, {per_mac:.2f}x its MACs ratio)"
            self._tqdm.write(
                f"trial {trial.number}: val {accuracy:.4f}  {mmacs:.2f} MMACs  {latency:.3f} ms{routing}  "
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
    if config.get("blocks_removed"):
        text += f", {config['blocks_removed']} block(s) removed"
    if config.get("num_experts", 1) > 1:
        text += f", {config.get('routing', DEFAULT_ROUTING)} routing, experts from {config.get('expert_init', DEFAULT_EXPERT_INIT)}"
    return text
