"""When a search stops early: Optuna-style callbacks ``(study, frozen_trial) -> None``.

A rule that ends the search quietly (the space is exhausted, time is up) calls ``study.stop()`` and sets
``stopped``; one that means the configuration is wrong raises the error that says what to change.
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipelines.errors import CompressionError, ConfigError
from search.early_stop import EARLY_STOP
from search.objective import REJECTED, is_repeat
from search.record import TrialRecord

__all__ = [
    "MAX_REPEATS",
    "MAX_REJECTIONS",
    "MaxRepeats",
    "MaxEarlyStops",
    "MaxRejections",
    "TooManyFailures",
    "Timeout",
    "stop_rules",
]

log = logging.getLogger("hycomp")

# A search stops when the sampler has proposed this many (or 2 x trials) already-evaluated configurations.
MAX_REPEATS = 20
# A search stops when this many sampled configurations in a row break a MACs / size budget before training.
MAX_REJECTIONS = 25


class MaxRepeats:
    """Stop once the sampler proposed ``max(MAX_REPEATS, 2 x trials)`` already-evaluated configurations."""

    def __init__(self, trials: int) -> None:
        self.limit = max(MAX_REPEATS, 2 * trials)
        self.stopped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        repeats = sum(is_repeat(item) for item in completed)
        if repeats >= self.limit:
            log.warning(
                "the sampler proposed already-evaluated configurations %d times: the space has few new points "
                "left. Stopping with %d evaluated; widen `space:` to search further.",
                repeats,
                len(completed) - repeats,
            )
            self.stopped = True
            study.stop()


class MaxEarlyStops:
    """Stop once ``max(MAX_REPEATS, 2 x trials)`` trials were stopped early (:mod:`search.early_stop`): the
    sampler keeps proposing configurations that cannot reach the front, and they do not count as trials."""

    def __init__(self, trials: int) -> None:
        self.limit = max(MAX_REPEATS, 2 * trials)
        self.stopped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        stops = sum(TrialRecord.of(item).fail_reason.startswith(EARLY_STOP) for item in pruned)
        if stops >= self.limit:
            log.warning(
                "%d trials were stopped early: the sampler keeps proposing configurations that cannot reach "
                "the front. Stopping with %d completed; widen `space:` or set study.early_stop.enabled: false.",
                stops,
                len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
            )
            self.stopped = True
            study.stop()


class MaxRejections:
    """Raise a ConfigError once ``MAX_REJECTIONS`` sampled configurations in a row broke a budget."""

    def __init__(self, limit: int = MAX_REJECTIONS) -> None:
        self.limit = limit
        self.stopped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        rejected = rejected_in_a_row(study)
        if len(rejected) >= self.limit:
            raise ConfigError(
                f"constraints: the last {len(rejected)} sampled configurations were all rejected before training "
                f"(latest: {rejected[-1]}). The budget is below what this space reaches: raise the limit "
                "(--max-mmacs / --max-size-kb or the constraints: section) or allow higher sparsity / fewer bits "
                "in space:."
            )


class TooManyFailures:
    """Raise a CompressionError once the last ``window`` finished trials all failed."""

    def __init__(self, window: int = 5) -> None:
        self.window = window
        self.stopped = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        finished = [item for item in study.trials if item.state in (TrialState.COMPLETE, TrialState.FAIL)]
        if len(finished) >= self.window and all(
            item.state == TrialState.FAIL for item in finished[-self.window :]
        ):
            raise CompressionError(
                f"the last {self.window} trials all failed; stopping. `hycomp front` lists their reasons."
            )


class Timeout:
    """Stop after ``minutes`` (None: never). ``stopped`` is also read between trials, by waiting workers."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes = minutes
        self.deadline = None if minutes is None else time.time() + 60 * minutes
        self._logged = False

    @property
    def stopped(self) -> bool:
        expired = self.deadline is not None and time.time() > self.deadline
        if expired and not self._logged:
            self._logged = True
            log.info("timeout reached after %s minutes", self.minutes)
        return expired

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.stopped:
            study.stop()


def stop_rules(trials: int, timeout_minutes: float | None) -> list:
    """The rules of one search loop, in the order they are checked after each trial."""
    return [
        Timeout(timeout_minutes),
        MaxRepeats(trials),
        MaxEarlyStops(trials),
        MaxRejections(),
        TooManyFailures(),
    ]


def rejected_in_a_row(study: optuna.Study) -> list[str]:
    """Reasons of the trailing run of trials rejected before training by a budget (surplus trials skipped)."""
    reasons: list[str] = []
    for trial in reversed(study.get_trials(deepcopy=False)):
        reason = TrialRecord.of(trial).fail_reason
        if trial.state == TrialState.PRUNED and reason.startswith(REJECTED):
            reasons.append(reason)
        elif trial.state == TrialState.PRUNED and reason.startswith(EARLY_STOP):
            break  # it was within the budget and trained
        elif trial.state == TrialState.PRUNED or trial.state == TrialState.RUNNING:
            continue  # a surplus trial of a parallel worker, or one still running elsewhere
        else:
            break
    return reasons[::-1]
