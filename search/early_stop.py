"""Stop a trial after a stage once it can no longer reach the Pareto front.

Optuna's pruners (``trial.report`` / ``should_prune``) are single-objective, so the rule is built here on
the study's front. After stage ``s`` a trial can at best reach its accuracy after ``s`` plus the gain that
the later stages (and deployment) added in the study's earlier trained trials (final deployed val accuracy
minus the val accuracy after ``s``; their ``quantile``, 1.0 = the largest) plus ``slack``. It is hopeless
when a feasible front trial with at most its MMACs is more accurate than that: dominated on accuracy and
MACs. Latency is only measured at the end, so it is not considered: the rule assumes that a clearly less
accurate trial at equal or more MACs does not reach the front on latency alone. :func:`replay` measures
how often that, or the learned gain, was wrong on a finished study (``search/benchmarks/early_stop.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config import EarlyStopSettings
from search.record import TrialRecord

__all__ = ["EARLY_STOP", "STAGES", "Verdict", "StoppedEarly", "judge", "stage_check", "Replay", "replay"]

EARLY_STOP = "early stop after"  # the reason prefix of a trial the rule stopped

# on_stage's stage name -> its key in Training.stage_val_accuracy, in the order compress_hybrid reports them
STAGES = {"prune": "pruned", "finetune": "finetuned", "moe": "moe", "quantize": "quantized"}


@dataclass(frozen=True)
class Verdict:
    """Why a trial is hopeless after ``stage``: its best reachable accuracy is below ``by_trial``'s."""

    stage: str
    val_accuracy: float
    gain: float  # the learned gain of the later stages
    slack: float
    learned_from: int  # earlier trials the gain was learned from
    mmacs: float
    by_trial: int
    by_accuracy: float
    by_mmacs: float

    @property
    def reachable(self) -> float:
        return self.val_accuracy + self.gain + self.slack

    @property
    def reason(self) -> str:
        return (
            f"{EARLY_STOP} {self.stage}: val {self.val_accuracy:.4f} + learned gain {self.gain:.4f} "
            f"+ slack {self.slack:.4f} = {self.reachable:.4f} < {self.by_accuracy:.4f} of trial {self.by_trial} at "
            f"{self.by_mmacs:.4g} <= {self.mmacs:.4g} MMACs (gain learned from {self.learned_from} trials; "
            "latency not compared)"
        )


class StoppedEarly(Exception):
    """Raised by a :func:`stage_check` callback: the verdict and what the trial finished before it."""

    def __init__(self, verdict: Verdict, val_accuracy: dict[str, float], seconds: dict[str, float]) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict
        self.val_accuracy = val_accuracy  # keyed like Training.stage_val_accuracy
        self.seconds = seconds


def _teachers(trials: Sequence[FrozenTrial]) -> list[tuple[FrozenTrial, TrialRecord]]:
    """Completed trials that trained their own model: the reference (no compression, no gain) and trials
    that reused a model or a result (their stage accuracies are another trial's) teach nothing."""
    taught = []
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not trial.values:
            continue
        record = TrialRecord.of(trial)
        if record.trained and not record.reference and not record.is_repeat and record.training is not None:
            taught.append((trial, record))
    return taught


def _learned_gain(trials: Sequence[FrozenTrial], stage: str, quantile: float) -> tuple[float, int]:
    """The ``quantile`` of (final deployed val accuracy - val accuracy after ``stage``), and its count."""
    key = STAGES[stage]
    gains = [
        trial.values[0] - record.training.stage_val_accuracy[key]
        for trial, record in _teachers(trials)
        if key in record.training.stage_val_accuracy
    ]
    if not gains:
        return 0.0, 0
    return float(np.quantile(gains, quantile, method="higher")), len(gains)


def _front_points(front: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Feasible front trials that are not repeats (a repeat is its original's point again)."""
    return [
        trial
        for trial in front
        if trial.values
        and all(value <= 0 for value in trial.constraints.values())
        and not TrialRecord.of(trial).is_repeat
    ]


def judge(
    settings: EarlyStopSettings,
    trials: Sequence[FrozenTrial],
    front: Sequence[FrozenTrial],
    stage: str,
    val_accuracy: float,
    mmacs: float | Callable[[], float],
) -> Verdict | None:
    """The verdict on a trial with ``val_accuracy`` after ``stage`` (an ``on_stage`` name), or None to go on.

    ``trials``: the study's trials (the completed ones that trained their model teach the gain); ``front``:
    its Pareto front (``study.best_trials``); ``mmacs``: the trial's MMACs, or a function computing them,
    called only when some front trial is more accurate than the trial can reach."""
    if not settings.enabled or stage not in STAGES or not math.isfinite(val_accuracy):
        return None
    gain, count = _learned_gain(trials, stage, settings.quantile)
    if count < settings.min_trials:
        return None
    reachable = val_accuracy + gain + settings.slack
    better = [trial for trial in _front_points(front) if trial.values[0] > reachable]
    if not better:
        return None
    cost = mmacs() if callable(mmacs) else mmacs
    within = [trial for trial in better if trial.values[1] <= cost]
    if not within:
        return None
    best = max(within, key=lambda trial: (trial.values[0], -trial.values[1]))
    return Verdict(
        stage=stage,
        val_accuracy=val_accuracy,
        gain=gain,
        slack=settings.slack,
        learned_from=count,
        mmacs=cost,
        by_trial=best.number,
        by_accuracy=best.values[0],
        by_mmacs=best.values[1],
    )


def stage_check(
    settings: EarlyStopSettings,
    study: optuna.Study,
    record: TrialRecord,
    mmacs: Callable[[], float],
) -> Callable[[str, float, float], None] | None:
    """An ``on_stage(stage, seconds, val_accuracy)`` callback for the training of ``record``'s trial that
    raises :class:`StoppedEarly` once :func:`judge` finds it hopeless on the study as it is then; None when
    the rule must not act on it (disabled, the reference, a repeat). ``mmacs`` is called at most once."""
    if not settings.enabled or record.reference or record.is_repeat:
        return None
    accuracies: dict[str, float] = {}
    seconds: dict[str, float] = {}
    cost: list[float] = []

    def trial_mmacs() -> float:
        if not cost:
            cost.append(mmacs())
        return cost[0]

    def on_stage(stage: str, stage_seconds: float, val_accuracy: float) -> None:
        if stage in STAGES:
            accuracies[STAGES[stage]] = val_accuracy
        seconds[stage] = stage_seconds
        verdict = judge(
            settings,
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            study.best_trials,
            stage,
            val_accuracy,
            trial_mmacs,
        )
        if verdict is not None:
            raise StoppedEarly(verdict, dict(accuracies), dict(seconds))

    return on_stage


# ------------------------------------------------------------------------------------------------ replay


@dataclass(frozen=True)
class Replay:
    """What the rule would have done on a finished study, each trial judged on the trials before it."""

    judged: int  # trials that trained their model (the reference excluded)
    stopped: list[tuple[int, Verdict]] = field(default_factory=list)  # trial number, why
    saved_seconds: float = 0.0  # the training, deployment and measurement the stopped trials skip
    total_seconds: float = 0.0  # what the judged trials spent in all
    stopped_on_front: list[int] = field(default_factory=list)  # stopped trials on the study's final front

    def by_stage(self) -> dict[str, int]:
        counts = dict.fromkeys(STAGES, 0)
        for _, verdict in self.stopped:
            counts[verdict.stage] += 1
        return {stage: count for stage, count in counts.items() if count}


def _reported_stages(record: TrialRecord) -> list[str]:
    """The stages ``on_stage`` reported for a finished trial, in order (finetune only when it ran)."""
    return [stage for stage in STAGES if stage != "finetune" or "finetune" in record.seconds]


def _spent_until(record: TrialRecord, stage: str) -> float:
    """Seconds spent when ``stage`` is reported (prune is reported after the finetuning ran)."""
    order = list(STAGES)
    done = order[: order.index(stage) + 1]
    if stage == "prune":
        done.append("finetune")
    return sum(record.seconds.get(name, 0.0) for name in done)


def _completed_before(trial: FrozenTrial, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials that finished before ``trial`` started (by number when times are missing)."""
    before = []
    for other in trials:
        if other.number == trial.number or other.state != TrialState.COMPLETE:
            continue
        if other.datetime_complete is not None and trial.datetime_start is not None:
            if other.datetime_complete <= trial.datetime_start:
                before.append(other)
        elif other.number < trial.number:
            before.append(other)
    return before


def _front_of(
    trials: Sequence[FrozenTrial], directions: Sequence[optuna.study.StudyDirection]
) -> list[FrozenTrial]:
    """Optuna's Pareto front (``best_trials``, constraints included) of ``trials`` alone."""
    study = optuna.create_study(directions=list(directions))
    # only what the front needs (a trial's parameters may lie outside the space now: the reference's)
    study.add_trials(
        [optuna.trial.create_trial(values=trial.values, system_attrs=trial.system_attrs) for trial in trials]
    )  # numbered 0, 1, ... in the order added
    return [trials[best.number] for best in study.best_trials]


def replay(study: optuna.Study, settings: EarlyStopSettings) -> Replay:
    """Apply the rule to every completed trial of ``study`` that trained its model, in order, with only the
    trials completed before it started; the trial's final MMACs stand for the estimate the live rule uses
    (equal for a fixed top-k). Counts the stopped trials and the seconds they would have saved, and which of
    them are on the study's final front (a safe rule stops none)."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda trial: trial.number)
    final_front = {trial.number for trial in _front_points(study.best_trials)}
    judged, stopped, stopped_on_front = 0, [], []
    saved = total = 0.0
    for trial, record in _teachers(trials):
        judged += 1
        total += record.seconds.get("total", 0.0)
        earlier = _completed_before(trial, trials)
        front = _front_of(earlier, study.directions) if earlier else []
        for stage in _reported_stages(record):
            accuracy = record.training.stage_val_accuracy.get(STAGES[stage])
            if accuracy is None:
                continue
            verdict = judge(settings, earlier, front, stage, accuracy, trial.values[1])
            if verdict is not None:
                stopped.append((trial.number, verdict))
                saved += max(0.0, record.seconds.get("total", 0.0) - _spent_until(record, stage))
                if trial.number in final_front:
                    stopped_on_front.append(trial.number)
                break
    return Replay(
        judged=judged,
        stopped=stopped,
        saved_seconds=saved,
        total_seconds=total,
        stopped_on_front=stopped_on_front,
    )
