"""What one trial records, as one typed value: written to and read from an Optuna trial here only.

A trial's user attributes hold a single JSON entry (``RECORD_KEY``): the :class:`TrialRecord` as a dict
with its format version. Every reader goes through :meth:`TrialRecord.of`, so a study written by an
older hycomp (flat string keys, no version) is refused with a clear error instead of being misread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pipelines.errors import ConfigError

__all__ = [
    "RECORD_VERSION",
    "RECORD_KEY",
    "INTERRUPTED",
    "KILLED",
    "PER_EXPERT_FILES",
    "SINGLE_FILE",
    "Training",
    "Measurement",
    "TrialRecord",
]

RECORD_VERSION = 1
RECORD_KEY = "hycomp_record"

INTERRUPTED = "interrupted (Ctrl-C)"
# Recorded when a trial starts and replaced when it ends: a trial whose process dies keeps this reason.
KILLED = "worker killed while running this trial; retried"

# What a trial's latency and routing share were measured on (Measurement.routing_share_of).
SINGLE_FILE = "model.onnx"
PER_EXPERT_FILES = "per-expert files + numpy routing"


@dataclass(frozen=True)
class Training:
    """What training a configuration's model produced (shared by every trial that uses that model)."""

    expert_params: int
    achieved_sparsity: float
    class_assignment: list | None
    stage_val_accuracy: dict[str, float]


@dataclass(frozen=True)
class Measurement:
    """What measuring a trained model under a trial's inference settings gives (deployed engine)."""

    val_accuracy: float  # top-1 of the deployed engine
    val_accuracy_torch: float
    mmacs: float
    # the latency objective: latency_ratio x the teacher's quiet median (search.latency), or, without a
    # ratio, the model's own median
    latency_ms: float
    latency: dict[str, Any]  # the model's latency statistics, with backend, threads and versions
    # gate + routing share of batch-1 latency: of model.onnx (SINGLE_FILE, interleaved with its network
    # alone: pipelines.deploy.routing_cost) for a multi-expert model; else of the per-expert files' numpy glue
    routing_share: float | None
    size_kb: float
    params: int
    bits: int
    precision: str | None
    top1_agreement_with_torch: float
    routing_per_class: list[list[int]]
    effective_top_k: int
    # Timed interleaved with the teacher's int8 bundle (search.latency). Records written before these
    # fields existed load with these defaults: they were timed alone, on ONNX Runtime.
    engine: str = "onnxruntime"
    latency_ratio: float | None = None  # model / teacher: the median over rounds of their medians' ratio
    latency_ratio_min: float | None = None
    teacher_latency: dict[str, Any] | None = None  # the teacher's statistics from the same rounds
    routing_share_of: str = PER_EXPERT_FILES  # what ``routing_share`` was measured on (and latency timed)
    macs_ratio: float | None = None  # mmacs / the teacher's
    # the same file timed against the teacher at measure.throughput_batch (the teacher's statistics beside it)
    batch_latency_ratio: float | None = None
    batch_latency: dict[str, Any] | None = None
    teacher_batch_latency: dict[str, Any] | None = None

    @property
    def objectives(self) -> tuple[float, float, float]:
        return self.val_accuracy, self.mmacs, self.latency_ms

    @property
    def file_routing_share(self) -> float | None:
        """The gate + routing share of a multi-expert ``model.onnx``, what ``constraints.max_routing_share``
        bounds; None for a single net, a record timed on the numpy glue, or a predicted latency."""
        return self.routing_share if self.routing_share_of == SINGLE_FILE else None

    @property
    def latency_per_mac(self) -> float | None:
        """The latency ratio to the teacher at the throughput batch over the MACs ratio, what
        ``constraints.max_latency_per_mac`` bounds: 1 when time falls as MACs do. None where not timed."""
        if self.batch_latency_ratio is None or not self.macs_ratio:
            return None
        return self.batch_latency_ratio / self.macs_ratio


@dataclass(frozen=True)
class TrialRecord:
    """Everything a trial records. Fields fill in as the trial runs; an enqueued trial starts with
    ``reference`` or ``queued_by`` only."""

    config: dict[str, Any] | None = None  # the configuration suggest() returned (effective_top_k included)
    reference: str = ""  # non-empty for the enqueued uncompressed reference point
    queued_by: int | None = None  # the trial whose trained model queued this one with other test-time views
    model: str = ""  # the model cache key (what determines the trained weights)
    trained: bool = False  # this trial trained its model (False: the model came from the cache)
    repeat_of: int | None = None  # same configuration and inference settings: that trial's result reused
    training: Training | None = None
    measurement: Measurement | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # what this trial spent, per stage and total
    fail_reason: str = ""
    # a trial stopped after a stage (search.early_stop): the val accuracy after each stage it finished
    partial_val_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def is_repeat(self) -> bool:
        return self.repeat_of is not None

    @property
    def interrupted(self) -> bool:
        return self.fail_reason in (INTERRUPTED, KILLED)

    def parameters(self, trial_params: dict[str, Any]) -> dict[str, Any]:
        """The configuration (``trial_params``, Optuna's, where the trial recorded none)."""
        return dict(self.config if self.config is not None else trial_params)

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> TrialRecord:
        """The record ``data`` (written by :meth:`to_dict`); ``where`` names it in the error."""
        version = data.get("version") if isinstance(data, dict) else None
        if version != RECORD_VERSION:
            raise ConfigError(
                f"{where}: record format {version!r}, this hycomp reads {RECORD_VERSION}: the study was made by "
                "an older hycomp. Re-run `hycomp search` into a new study name (study.name)."
            )
        values = {key: value for key, value in data.items() if key != "version"}
        unknown = set(values) - {item.name for item in fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown record fields {sorted(unknown)}; re-run `hycomp search`.")
        if values.get("training") is not None:
            values["training"] = Training(**values["training"])
        if values.get("measurement") is not None:
            values["measurement"] = Measurement(**values["measurement"])
        return cls(**values)

    def user_attrs(self) -> dict[str, Any]:
        """The user attributes that hold this record (for ``study.enqueue_trial(user_attrs=...)``)."""
        return {RECORD_KEY: self.to_dict()}

    def write(self, trial: Any) -> TrialRecord:
        """Store this record on a running ``optuna.Trial``; returns it, for chaining."""
        trial.set_user_attr(RECORD_KEY, self.to_dict())
        return self

    def update(self, trial: Any, **changes: Any) -> TrialRecord:
        """This record with ``changes``, stored on ``trial``."""
        return replace(self, **changes).write(trial)

    @classmethod
    def of(cls, trial: Any) -> TrialRecord:
        """The record of a trial (running or frozen). A trial with no user attributes (one that never
        started) has an empty record; one with attributes but no record is from an older hycomp."""
        attrs = trial.user_attrs
        if RECORD_KEY not in attrs:
            if attrs:
                raise ConfigError(
                    f"trial {trial.number}: no {RECORD_KEY!r} record (it has {sorted(attrs)[:4]}): the study "
                    "was made by an older hycomp. Re-run `hycomp search` into a new study name (study.name)."
                )
            return cls()
        return cls.from_dict(attrs[RECORD_KEY], f"trial {trial.number}")
