"""The Optuna objective: sample a configuration, get its trained model, measure it, return the objectives.

Objectives (a true multi-objective study, not a weighted sum):
  val_accuracy (maximize)  top-1 on the validation split, of the deployed engine (int8 ONNX Runtime)
  mmacs        (minimize)  millions of MACs per input actually executed: gate + top_k experts
  latency_ms   (minimize)  batch-1 latency of the deployed engine: its ratio to the int8 teacher, timed
                           interleaved, times the teacher's quiet latency (search.latency)

A configuration measured before under the same inference settings reuses that trial's result (a repeat,
not counted toward ``study.trials``); one whose model is cached (:mod:`search.model_cache`) is only
measured again. A trial that can no longer reach the front after a stage stops there, PRUNED with its
reason (:mod:`search.early_stop`). Only a compression stage's own errors (:class:`CompressionError`) fail
a trial.
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import TrialState

from pipelines.errors import CompressionError
from search.early_stop import StoppedEarly, stage_check
from search.evaluation import TrialContext, estimate_cost, log_measured, measure, train_model
from search.model_cache import ModelCache, inference_settings, model_key
from search.record import INTERRUPTED, KILLED, TrialRecord
from search.space import suggest

__all__ = [
    "OBJECTIVES",
    "DIRECTIONS",
    "REJECTED",
    "Objective",
    "is_repeat",
    "reference_missing",
]

OBJECTIVES = ("val_accuracy", "mmacs", "latency_ms")
DIRECTIONS = ("maximize", "minimize", "minimize")

REJECTED = "rejected before training"  # the reason prefix of a configuration that breaks a budget
SURPLUS = "not needed: the target number of trials is already reached"

log = logging.getLogger("hycomp")


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose configuration was already measured: it reused that trial's result."""
    return TrialRecord.of(trial).is_repeat


def reference_missing(study: optuna.Study) -> bool:
    """True when the study has no reference trial that finished, waits or runs: a new study, or one whose
    reference was interrupted (Ctrl-C, a killed worker) and has to be queued again."""
    for trial in study.get_trials(deepcopy=False):
        record = TrialRecord.of(trial)
        if record.reference and not (trial.state == TrialState.FAIL and record.interrupted):
            return False
    return True


class Objective:
    """The callable handed to ``study.optimize``."""

    def __init__(self, ctx: TrialContext, target_trials: int | None = None) -> None:
        self.ctx = ctx
        self.target_trials = target_trials
        self.models = ModelCache(ctx.study_folder / "models")

    def _surplus(self, trial: optuna.Trial) -> bool:
        """True when trials numbered before this one already fill the target (parallel workers raced).
        Repeats do not count toward the target."""
        if self.target_trials is None:
            return False
        ahead = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if t.number < trial.number and not is_repeat(t)
        ]
        return len(ahead) >= self.target_trials

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        cfg = self.ctx.cfg
        queued = TrialRecord.of(trial)  # what enqueue_trial gave it: reference, queued_by
        if self._surplus(trial):
            queued.update(trial, fail_reason=SURPLUS)
            raise optuna.TrialPruned("surplus trial")
        params = suggest(trial, cfg.space)
        key = model_key(params, cfg.trial, cfg.seed, self.ctx.setup())
        # Until the trial ends, its reason is what it would be if this process died now.
        record = TrialRecord(
            config=params,
            reference=queued.reference,
            queued_by=queued.queued_by,
            model=key,
            fail_reason=KILLED,
        ).write(trial)
        try:
            return self._run(trial, record)
        except KeyboardInterrupt:
            TrialRecord.of(trial).update(trial, fail_reason=INTERRUPTED)
            raise
        except (CompressionError, optuna.TrialPruned):
            raise  # their reasons are recorded where they are raised
        except Exception as error:  # a bug: the search stops with its traceback; the trial says why
            TrialRecord.of(trial).update(
                trial, fail_reason=f"unexpected {type(error).__name__}: {error}"[:2000]
            )
            raise

    def _run(self, trial: optuna.Trial, record: TrialRecord) -> tuple[float, float, float]:
        cfg, params = self.ctx.cfg, record.config
        original = self._measured_before(trial, record)
        if original is not None:
            # Samplers revisit points of a discrete space; same model and inference settings give the same
            # result, so it is reused instead of spending minutes measuring it again.
            log.info(
                "trial %d: same configuration as trial %d; its result is reused",
                trial.number,
                original.number,
            )
            reused = TrialRecord.of(original)
            record = record.update(
                trial,
                trained=False,
                repeat_of=original.number,
                training=reused.training,
                measurement=reused.measurement,
                seconds=reused.seconds,
                fail_reason="",
            )
            self._set_constraints(trial, record)
            return tuple(original.values)
        started = time.perf_counter()
        try:
            self._check_budget(trial, record)
            hopeless = stage_check(
                cfg.study.early_stop, trial.study, record, lambda: estimate_cost(self.ctx, params)["mmacs"]
            )
            model, trained = self.models.get_or_train(
                record.model,
                lambda: train_model(self.ctx, params, cfg.trial, cfg.seed, f"trial {trial.number}", hopeless),
            )
            if not trained:
                log.info(
                    "trial %d: its model is cached (trained by an earlier trial); measured with %s view(s)",
                    trial.number,
                    params.get("views", 1),
                )
            folder = self.ctx.study_folder / "trials" / f"trial_{trial.number}"
            measurement, seconds = measure(self.ctx, params, model, folder)
            log_measured(f"trial {trial.number}", seconds)
        except StoppedEarly as stop:
            # PRUNED, not failed: nothing went wrong; what it finished is kept with the reason
            reason = stop.verdict.reason
            record.update(
                trial,
                partial_val_accuracy=stop.val_accuracy,
                seconds={**stop.seconds, "total": time.perf_counter() - started},
                fail_reason=reason,
            )
            log.info("trial %d: %s", trial.number, reason)
            raise optuna.TrialPruned(reason) from None
        except CompressionError as error:
            reason = f"{type(error).__name__}: {error}"
            record.update(trial, fail_reason=reason[:2000])
            log.warning("trial %d failed: %s", trial.number, reason)
            raise
        record = record.update(
            trial,
            trained=trained,
            training=model.training,
            measurement=measurement,
            seconds={**model.seconds, **seconds, "total": time.perf_counter() - started},
        )
        self._set_constraints(trial, record)
        if trained and not record.reference:
            self._queue_other_views(trial, params)
        record.update(trial, fail_reason="")  # last: a kill before Optuna's tell still leaves the reason
        return measurement.objectives

    def _measured_before(self, trial: optuna.Trial, record: TrialRecord) -> optuna.trial.FrozenTrial | None:
        """The earliest completed trial (not itself a repeat) with this model and these inference settings."""
        settings = inference_settings(record.config)
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            earlier = TrialRecord.of(other)
            if (
                not earlier.is_repeat
                and earlier.model == record.model
                and inference_settings(earlier.config or {}) == settings
            ):
                return other
        return None

    def _queue_other_views(self, trial: optuna.Trial, params: dict) -> None:
        """Queue this trained model with every other ``space.views`` value as the next trials: each is a
        re-measurement (seconds, no training), so every trained model is seen with and without views."""
        for views in self.ctx.cfg.space.views:
            if views != params.get("views", 1):
                trial.study.enqueue_trial(
                    {**trial.params, "views": views},
                    user_attrs=TrialRecord(queued_by=trial.number).user_attrs(),
                    skip_if_exists=True,
                )

    def _check_budget(self, trial: optuna.Trial, record: TrialRecord) -> None:
        limits = self.ctx.cfg.constraints
        if limits.max_mmacs is None and limits.max_size_kb is None:
            return
        cost = estimate_cost(self.ctx, record.config)
        for key, limit in (("mmacs", limits.max_mmacs), ("size_kb", limits.max_size_kb)):
            if limit is not None and cost[key] > limit:
                reason = f"{REJECTED}: {key} {cost[key]:.3f} > constraints.max_{key} {limit}"
                record.update(trial, fail_reason=reason)
                raise optuna.TrialPruned(reason)

    def _set_constraints(self, trial: optuna.Trial, record: TrialRecord) -> None:
        limits, measured = self.ctx.cfg.constraints, record.measurement
        if limits.max_latency_ms is not None:
            trial.set_constraint("latency_ms", measured.latency_ms - limits.max_latency_ms)
        if limits.max_size_kb is not None:
            trial.set_constraint("size_kb", measured.size_kb - limits.max_size_kb)
        if limits.min_accuracy is not None:
            trial.set_constraint("val_accuracy", limits.min_accuracy - measured.val_accuracy)
        if limits.max_mmacs is not None:
            trial.set_constraint("mmacs", measured.mmacs - limits.max_mmacs)
        if limits.max_routing_share is not None and measured.file_routing_share is not None:
            trial.set_constraint("routing_share", measured.file_routing_share - limits.max_routing_share)
        if limits.max_latency_per_mac is not None and measured.latency_per_mac is not None:
            trial.set_constraint("latency_per_mac", measured.latency_per_mac - limits.max_latency_per_mac)
