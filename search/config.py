"""The search configuration: a YAML file validated by one schema into typed, frozen sections.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the field as the user
wrote it (a dotted path), the value and the fix. Ranges are checked once, by the pipelines' own config types
(``TrainConfig``, ``PruneConfig``, ``MoEConfig``, ``ModelSpec`` ...); this module renames their fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.compress.depth import DepthConfig
from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import AUGMENT_VIEWS, MEDMNIST_SIZES, USER_LAYOUTS, dataset_names
from pipelines.deploy.engines import ENGINES
from pipelines.errors import ConfigError, unknown_name
from pipelines.files import sha256_file
from pipelines.hybrid import DEFAULT_EXPERT_INIT, HybridConfig, StageBudget
from pipelines.models import ModelSpec
from pipelines.moe import DEFAULT_EXPERT_TRAINING, DEFAULT_LAYOUT, DEFAULT_ROUTING, MoEConfig
from pipelines.stages import num_stages
from pipelines.symmetry import check_views
from pipelines.train import TrainConfig
from search.samplers import check_sampler
from search.typed import build, plain

__all__ = [
    "resolved_augment",
    "EarlyStopSettings",
    "MAX_STUDY_NAME",
    "SearchConfig",
    "ModelSettings",
    "BaselineSettings",
    "Budget",
    "Space",
    "load_config",
    "parse_config",
    "dump_config",
    "stable_hash",
    "setup_fingerprint",
]

AUTO = "auto"  # an augment the symmetry probe chooses on the data (pipelines.symmetry_probe)

KD_TARGETS: tuple[str, ...] = ("online", "ensemble")  # see TrialContext.training_data
MAX_STUDY_NAME = 100  # characters; a study is a folder, and its SQLite path must stay openable
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one folder under the results root, not hidden
MAX_SEED = 2**31 - 1  # numpy's and Optuna's seeds stop at 2**32 - 1; workers add their index


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    step: int = 1


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    step: float | None = None


@dataclass(frozen=True)
class SamplerSettings:
    name: str = "tpe"
    seed: int | None = 0
    options: dict = field(default_factory=dict)  # passed to the Optuna sampler as keyword arguments


@dataclass(frozen=True)
class EarlyStopSettings:
    """When a trial stops after a stage because it cannot reach the front (:mod:`search.early_stop`)."""

    enabled: bool = True
    min_trials: int = 4  # earlier trained trials with that stage's accuracy before the rule acts
    quantile: float = 1.0  # of the gains later stages added in earlier trials (1.0: the largest)
    slack: float = 0.005  # accuracy added on top of the learned gain


@dataclass(frozen=True)
class StudySettings:
    name: str = "hycomp"
    trials: int = 8
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    storage: str | None = None  # default: sqlite:///results/<name>/study.db
    enqueue_baseline: bool = True
    timeout_minutes: float | None = None
    early_stop: EarlyStopSettings = field(default_factory=EarlyStopSettings)


@dataclass(frozen=True)
class DataSettings:
    """Which data: a MedMNIST flag or cifar10 (files under ``root``), ``folder`` (``root`` holds
    train/<class>/, val/<class>/, test/<class>/ images) or ``npz`` (``path``: MedMNIST's array layout)."""

    dataset: str = "bloodmnist"
    root: str | None = None
    path: str | None = None  # the file of ``dataset: npz``
    size: int = 28
    download: bool = False
    verify_md5: bool = True
    split_seed: int = 0  # seeds the stratified validation split cut from train when the data has none


@dataclass(frozen=True)
class ModelSettings:
    """The model to compress (the fields of :class:`pipelines.models.ModelSpec`) and how pruning rounds."""

    arch: str = "resnet20"
    width: float = 1.0
    small_input: bool | str = "auto"  # true | false | auto: small-image stem for torchvision models
    kwargs: dict = field(default_factory=dict)  # keyword arguments of a torchvision builder or callable
    exclude: tuple[str, ...] = ()  # module names pruning leaves untouched
    checkpoint: str | None = None  # trained fp32 weights (a state_dict file): the teacher, not trained
    channel_multiple: int = 8  # pruned layers keep multiples of this many channels (1 = exact ratio)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            arch=self.arch,
            width=self.width,
            small_input=self.small_input,
            kwargs=dict(self.kwargs),
            exclude=self.exclude,
            checkpoint=self.checkpoint,
        )

    def identity(self) -> dict:
        """The spec as plain data, with a checkpoint's content (sha256) beside its path: a cache key."""
        identity = self.spec.to_dict()
        if self.checkpoint is not None:
            path = Path(self.checkpoint)
            if not path.is_file():
                raise ConfigError(
                    f"model.checkpoint: {self.checkpoint!r} does not exist. Give the path of a state_dict file."
                )
            identity["checkpoint_sha256"] = sha256_file(path)
        return identity


@dataclass(frozen=True)
class BaselineSettings:
    """Training of the fp32 teacher (cached, keyed by dataset, arch and these settings)."""

    epochs: float = 15
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    augment: str = "auto"  # auto | none | crop | hflip | flips | d4 (pipelines.train.AUGMENTS)
    precision: str = "fp32"  # fp32 | bf16 (pipelines.train: autocast training, 2.5x faster on AMX CPUs)
    seed: int = 0
    # students distil from this many teachers (seeds seed, seed+1, ...); the first is the one pruned
    teachers: int = 1

    def train_config(self) -> TrainConfig:
        """How the fp32 teacher is trained."""
        return TrainConfig(
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            schedule=self.schedule,
            augment=self.augment,
            seed=self.seed,
            precision=self.precision,
        )


@dataclass(frozen=True)
class Budget:
    """Training budget of one trial's stages (multi-fidelity: trials cheap, export at full budget)."""

    subset: float = 1.0
    finetune_epochs: float = 3.0
    moe_epochs: float = 2.0
    qat_epochs: float = 0.5
    gate_epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 128
    kd_alpha: float = 0.7
    kd_temperature: float = 4.0
    label_smoothing: float = 0.1
    augment: str = "auto"  # auto | none | crop | hflip | flips | d4 (pipelines.train.AUGMENTS)
    precision: str = "fp32"  # fp32 | bf16 (pipelines.train)
    # online: the teacher on each batch | ensemble: the teachers averaged over the augment's views
    kd_targets: str = "online"

    def stage_budget(self, seed: int) -> StageBudget:
        """The pipelines' budget of one compression run at this budget."""
        return StageBudget(
            finetune_epochs=self.finetune_epochs,
            gate_epochs=self.gate_epochs,
            moe_epochs=self.moe_epochs,
            qat_epochs=self.qat_epochs,
            train=TrainConfig(
                lr=self.lr,
                batch_size=self.batch_size,
                kd_alpha=self.kd_alpha,
                kd_temperature=self.kd_temperature,
                label_smoothing=self.label_smoothing,
                augment=self.augment,
                subset=self.subset,
                seed=seed,
                precision=self.precision,
            ),
        )


@dataclass(frozen=True)
class Space:
    sparsity: FloatRange = field(default_factory=lambda: FloatRange(0.3, 0.8, 0.05))
    pruner: tuple[str, ...] = ("l1", "l2", "fpgm")
    bits: tuple[int, ...] = (4, 6, 8)
    quantizer: tuple[str, ...] = ("qat",)  # qat | ptq
    # One net by default: no Mixture-of-Experts beat a single compressed net at equal MACs on BloodMNIST
    # (results/bloodmnist/moe_levers.md); a space asks for experts with e.g. num_experts {low: 1, high: 4}.
    num_experts: IntRange = field(default_factory=lambda: IntRange(1, 1))
    top_k: IntRange = field(default_factory=lambda: IntRange(1, 1))
    gate_size: tuple[int, ...] = (8,)
    routing: tuple[str, ...] = (DEFAULT_ROUTING,)  # class-groups | learned (see pipelines/moe.py)
    expert_init: tuple[str, ...] = (DEFAULT_EXPERT_INIT,)  # copies | teachers (see pipelines/hybrid.py)
    views: tuple[int, ...] = (
        1,
    )  # test-time symmetry views averaged per input: 1 | 2 | 4 | 8 (pipelines/moe.py)
    # residual blocks removed before pruning (pipelines/compress/depth.py); 0..0: not searched
    blocks_removed: IntRange = field(default_factory=lambda: IntRange(0, 0))
    # which blocks go: output (least output change) | latency (least change per share of the teacher's
    # deployed latency, measured once per study at measure.throughput_batch; pipelines/compress/depth.py)
    block_ranking: tuple[str, ...] = ("output",)
    layout: tuple[str, ...] = (
        DEFAULT_LAYOUT,
    )  # separate | shared (one trunk + expert tails; pipelines/moe.py)
    split_at: IntRange = field(
        default_factory=lambda: IntRange(1, 1)
    )  # shared layout: first stage of the experts
    # joint | group: each expert trained alone on its class group's images (pipelines/group_training.py)
    expert_training: tuple[str, ...] = (DEFAULT_EXPERT_TRAINING,)


LATENCY_SOURCES = ("measured", "predicted")

# The batch a trial's latency is also timed at (measure.throughput_batch): batch 1 is latency-bound, a
# large batch shows whether removed MACs save time where per-call overhead no longer hides it (issue #25).
THROUGHPUT_BATCH = 64


ENGINE_SETTINGS: tuple[str, ...] = (AUTO, *ENGINES)  # measure.engine


@dataclass(frozen=True)
class MeasureSettings:
    """How trials are timed: at batch 1 on ``engine`` with ``latency_threads`` threads, interleaved with the
    teacher's int8 bundle (:mod:`search.latency`): ``latency_repeats`` timed calls of each, in
    ``latency_rounds`` rounds that alternate the two, so a busy machine slows both alike."""

    latency_threads: int = 1
    latency_repeats: int = 30  # timed calls of the trial's model (and as many of the teacher's) per trial
    latency_rounds: int = 10  # rounds those calls are split into (at most latency_repeats)
    int8_engine: bool = True  # trials are deployed int8 (fp32 for 32-bit trials)
    engine: str = AUTO  # auto (the faster one on the teacher at the study's start) | onnxruntime | openvino
    # measured: each trial's bundle is timed; predicted: its latency comes from the per-device kernel table
    # (pipelines.deploy.latency_table), kept under <results>/profiles/ unless ``profile`` names a file.
    latency: str = "measured"
    profile: str | None = None
    profile_any_cpu: bool = False  # accept a ``profile`` measured on another CPU (a cross-device prediction)
    # each trial is also timed at this batch against the teacher at the same batch (a few short rounds): does
    # its latency fall as its MACs do (Measurement.latency_per_mac)? null: batch 1 only
    throughput_batch: int | None = THROUGHPUT_BATCH

    @property
    def rounds(self) -> int:
        return min(self.latency_rounds, self.latency_repeats)

    @property
    def calls_per_round(self) -> int:
        return math.ceil(self.latency_repeats / self.rounds)


# A multi-expert model spending more of its batch-1 latency than this on gate and routing (measured on its
# model.onnx) is infeasible: a single net of its experts' size would serve better (issues #25 and #26).
MAX_ROUTING_SHARE = 0.10


@dataclass(frozen=True)
class Constraints:
    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    min_accuracy: float | None = None
    max_mmacs: float | None = None
    max_routing_share: float | None = MAX_ROUTING_SHARE  # of multi-expert models only; null: no limit
    # latency ratio to the teacher at measure.throughput_batch over the MACs ratio: 1 = time falls as MACs do,
    # 1.5 = half again the time its MACs promise (Measurement.latency_per_mac); null: no limit
    max_latency_per_mac: float | None = None


@dataclass(frozen=True)
class SearchConfig:
    study: StudySettings = field(default_factory=StudySettings)
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    trial: Budget = field(default_factory=Budget)
    export: Budget = field(
        default_factory=lambda: Budget(subset=1.0, finetune_epochs=6, moe_epochs=6, qat_epochs=2)
    )
    space: Space = field(default_factory=Space)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    constraints: Constraints = field(default_factory=Constraints)
    seed: int = 0

    def to_dict(self) -> dict:
        return plain(asdict(self))

    def model_identity(self) -> dict:
        """The model section as a cache key: the spec (a checkpoint by its content too) and the channel
        multiple that sets the pruned shapes."""
        return {**self.model.identity(), "channel_multiple": self.model.channel_multiple}

    def replace(self, **sections: Any) -> SearchConfig:
        """A copy with sections updated from plain mappings, re-validated (``replace(study={"trials": 3})``)."""
        merged = self.to_dict()
        for section, values in sections.items():
            if isinstance(merged.get(section), dict) and isinstance(values, dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
        return parse_config(merged)


# --------------------------------------------------------------------------------------------- schema


def _check_range(path: str, value: Any, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{path}: {value} is out of range; use a value in [{low}, {high}].")


def _checked(build: Callable[[], Any], names: dict[str, str]) -> Any:
    """``build()`` (a pipelines config that checks itself), its ConfigError renamed to the user's fields:
    ``names`` maps the pipelines' field (``train.lr``) or prefix (``train.``) to the user's."""
    try:
        return build()
    except ConfigError as error:
        message = str(error)
        for theirs, ours in names.items():
            if message.startswith(theirs):
                message = ours + message[len(theirs) :]
                break
        raise ConfigError(message) from None


def _check_finite(value: Any, path: str) -> None:
    """Every number of the file is finite (YAML reads ``.nan`` and ``.inf`` as floats)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_finite(item, f"{path}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(
            f"{path or 'space file'}: {value} is not a finite number. Write a number such as 0.5 (or null where allowed)."
        )


def _check_study_name(name: str) -> None:
    """A study lives in its own folder directly under the results root: one safe, visible folder name."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_STUDY_NAME:
        problem = f"is {len(name)} characters long, over the limit of {MAX_STUDY_NAME}"
    elif name.startswith("."):
        problem = (
            "starts with a dot (a hidden folder, or '.'/'..' which point outside the study's own folder)"
        )
    elif not STUDY_NAME.fullmatch(name):
        bad = sorted({char for char in name if not re.fullmatch(r"[A-Za-z0-9._-]", char)})
        problem = f"holds {', '.join(map(repr, bad))}, which may not be in a folder name"
    if problem:
        raise ConfigError(
            f"study.name: {name!r} {problem}. A study lives in its own folder under the results root: use 1 to "
            f"{MAX_STUDY_NAME} letters, digits, '-', '_' or '.', not starting with a dot (e.g. bloodmnist-resnet20)."
        )


def _check_seed(path: str, seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{path}: {seed} is out of range; use a seed in [0, {MAX_SEED}] (e.g. 0).")


def _validate(cfg: SearchConfig) -> None:
    if cfg.study.trials < 1:
        raise ConfigError(f"study.trials: {cfg.study.trials} must be a positive number of trials (e.g. 8).")
    _check_study_name(cfg.study.name)
    check_sampler(cfg.study.sampler.name, cfg.study.sampler.seed, cfg.study.sampler.options, _check_seed)
    timeout = cfg.study.timeout_minutes
    if timeout is not None and timeout <= 0:
        raise ConfigError(
            f"study.timeout_minutes: {timeout} must be > 0 minutes (e.g. 60), or null for no time limit."
        )
    _validate_early_stop(cfg.study.early_stop)
    _check_seed("seed", cfg.seed)
    _check_seed("baseline.seed", cfg.baseline.seed)
    _validate_data(cfg.data)
    spec = cfg.model.spec  # ModelSpec checks arch, width, small_input, kwargs, exclude, checkpoint
    _checked(
        lambda: PruneConfig(0.0, channel_multiple=cfg.model.channel_multiple, exclude=spec.exclude),
        {"prune.channel_multiple": "model.channel_multiple"},
    )
    # a search's learning rates stay in a range that trains (the pipelines accept any positive one)
    for prefix, section in (("baseline", cfg.baseline), ("trial", cfg.trial), ("export", cfg.export)):
        _check_range(f"{prefix}.lr", section.lr, 1e-6, 10.0)
    _checked(cfg.baseline.train_config, {"train.": "baseline."})
    for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
        _checked(
            lambda budget=budget: budget.stage_budget(0), {"train.": f"{prefix}.", "budget.": f"{prefix}."}
        )
        if budget.kd_targets not in KD_TARGETS:
            raise unknown_name(f"{prefix}.kd_targets", budget.kd_targets, KD_TARGETS)
    _check_range("baseline.teachers", cfg.baseline.teachers, 1, 8)
    if cfg.model.checkpoint is not None and cfg.baseline.teachers > 1:
        raise ConfigError(
            f"baseline.teachers: {cfg.baseline.teachers} teachers need different seeds, but model.checkpoint gives "
            "one set of weights. Set baseline.teachers: 1, or remove model.checkpoint to train the teachers."
        )
    if cfg.baseline.teachers > 1:
        for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
            if budget.kd_targets != "ensemble":
                raise ConfigError(
                    f"{prefix}.kd_targets: {budget.kd_targets!r} distils from one teacher, but baseline.teachers "
                    f"is {cfg.baseline.teachers}. Set {prefix}.kd_targets: ensemble (the teachers' averaged "
                    "logits) or baseline.teachers: 1."
                )
    _validate_space(cfg)
    _check_range("measure.latency_threads", cfg.measure.latency_threads, 1, 256)
    _check_range("measure.latency_repeats", cfg.measure.latency_repeats, 1, 100000)
    if cfg.measure.latency not in LATENCY_SOURCES:
        raise unknown_name("measure.latency", cfg.measure.latency, LATENCY_SOURCES)
    if cfg.measure.profile_any_cpu and not cfg.measure.profile:
        raise ConfigError(
            "measure.profile_any_cpu: true needs measure.profile, the table of the other device; set it or "
            "drop profile_any_cpu."
        )
    _check_range("measure.latency_rounds", cfg.measure.latency_rounds, 1, 10000)
    if cfg.measure.engine not in ENGINE_SETTINGS:
        raise unknown_name("measure.engine", cfg.measure.engine, ENGINE_SETTINGS)
    for name in ("max_latency_ms", "max_size_kb", "max_mmacs"):
        value = getattr(cfg.constraints, name)
        if value is not None and value <= 0:
            raise ConfigError(f"constraints.{name}: {value} must be > 0 (or null for no limit).")
    if cfg.constraints.min_accuracy is not None:
        _check_range("constraints.min_accuracy", cfg.constraints.min_accuracy, 0.0, 1.0)
    _validate_throughput(cfg)
    share = cfg.constraints.max_routing_share
    if share is not None and not 0.0 < share <= 1.0:
        raise ConfigError(
            f"constraints.max_routing_share: {share} must be in (0, 1] (a share of batch-1 latency, e.g. "
            "0.1), or null for no limit."
        )


def _validate_throughput(cfg: SearchConfig) -> None:
    batch, limit = cfg.measure.throughput_batch, cfg.constraints.max_latency_per_mac
    if batch is not None:
        _check_range("measure.throughput_batch", batch, 2, 1024)
    if limit is None:
        return
    if not 0.0 < limit <= 100.0:
        raise ConfigError(
            f"constraints.max_latency_per_mac: {limit} must be in (0, 100] (latency ratio over MACs ratio at "
            "measure.throughput_batch, e.g. 1.5), or null for no limit."
        )
    if batch is None:
        raise ConfigError(
            f"constraints.max_latency_per_mac: {limit} needs each trial timed at a large batch, but "
            "measure.throughput_batch is null. Set measure.throughput_batch (e.g. 64) or drop the constraint."
        )
    if cfg.measure.latency == "predicted":
        raise ConfigError(
            f"constraints.max_latency_per_mac: {limit} needs measured latency, but measure.latency is "
            "'predicted' (no large-batch timing). Set measure.latency: measured or drop the constraint."
        )


def _validate_early_stop(settings: EarlyStopSettings) -> None:
    if settings.min_trials < 1:
        raise ConfigError(
            f"study.early_stop.min_trials: {settings.min_trials} must be >= 1 earlier trained trials (e.g. 4); "
            "to turn the rule off, set study.early_stop.enabled: false."
        )
    if not 0.0 < settings.quantile <= 1.0:
        raise ConfigError(
            f"study.early_stop.quantile: {settings.quantile} is out of range; use a value in (0, 1] (1.0: the "
            "largest gain seen, the safest)."
        )
    _check_range("study.early_stop.slack", settings.slack, 0.0, 1.0)


def _check_bounds(path: str, bounds: IntRange | FloatRange) -> None:
    """low <= high, and a step that is positive and no wider than the range (Optuna would shrink the range
    to its low end)."""
    if bounds.low > bounds.high:
        raise ConfigError(f"{path}: low {bounds.low} > high {bounds.high}; swap them.")
    step = bounds.step
    if step is None:
        return
    if step <= 0:
        allowed = "an integer >= 1" if isinstance(bounds, IntRange) else "> 0, or null for a continuous range"
        raise ConfigError(f"{path}.step: {step} must be {allowed}.")
    span = bounds.high - bounds.low
    if span > 0 and step > span:
        raise ConfigError(
            f"{path}.step: {step} is wider than the range {bounds.low}..{bounds.high}; use a step up to "
            f"{round(span, 6)}{', or null' if isinstance(bounds, FloatRange) else ''}."
        )


def _validate_space(cfg: SearchConfig) -> None:
    """Every value the space can suggest is one the pipelines' configs accept."""
    space = cfg.space
    for item in dataclasses.fields(Space):
        value = getattr(space, item.name)
        if isinstance(value, IntRange | FloatRange):
            _check_bounds(f"space.{item.name}", value)
    sparsity = space.sparsity
    for end in ("low", "high"):
        _checked(
            lambda end=end: PruneConfig(getattr(sparsity, end)), {"prune.sparsity": f"space.sparsity.{end}"}
        )
    for end in ("low", "high"):
        _checked(
            lambda end=end: DepthConfig(blocks_removed=getattr(space.blocks_removed, end)),
            {"depth.blocks_removed": f"space.blocks_removed.{end}"},
        )
    for ranking in space.block_ranking:
        _checked(
            lambda ranking=ranking: DepthConfig(ranking=ranking), {"depth.ranking": "space.block_ranking"}
        )
    for pruner in space.pruner:
        _checked(lambda pruner=pruner: PruneConfig(0.0, pruner=pruner), {"prune.pruner": "space.pruner"})
    for bits in space.bits:
        _checked(lambda bits=bits: QuantizeConfig(bits=bits), {"quantize.bits": "space.bits"})
    for method in space.quantizer:
        _checked(lambda method=method: QuantizeConfig(method=method), {"quantize.method": "space.quantizer"})
    for end in ("low", "high"):
        _checked(
            lambda end=end: MoEConfig(num_experts=getattr(space.num_experts, end), top_k=1),
            {"moe.num_experts": f"space.num_experts.{end}"},
        )
    # top_k is clipped to the sampled number of experts, so only its lowest value must fit the largest MoE
    _checked(
        lambda: MoEConfig(num_experts=space.num_experts.high, top_k=space.top_k.low),
        {"moe.top_k": "space.top_k.low"},
    )
    _checked(
        lambda: MoEConfig(num_experts=max(space.top_k.high, 1), top_k=space.top_k.high),
        {"moe.num_experts": "space.top_k.high", "moe.top_k": "space.top_k.high"},
    )
    for gate_size in space.gate_size:
        _checked(
            lambda gate_size=gate_size: MoEConfig(gate_size=gate_size), {"moe.gate_size": "space.gate_size"}
        )
    for routing in space.routing:
        _checked(lambda routing=routing: MoEConfig(routing=routing), {"moe.routing": "space.routing"})
    for init in space.expert_init:
        _checked(
            lambda init=init: HybridConfig(PruneConfig(0.0), QuantizeConfig(), MoEConfig(), expert_init=init),
            {"expert_init": "space.expert_init"},
        )
    if "teachers" in space.expert_init and cfg.baseline.teachers < 2:
        raise ConfigError(
            f"space.expert_init: 'teachers' prunes each expert from a different teacher, but baseline.teachers "
            f"is {cfg.baseline.teachers}. Set baseline.teachers: 2 (or more), or remove 'teachers' from "
            "space.expert_init."
        )
    for layout in space.layout:
        _checked(lambda layout=layout: MoEConfig(layout=layout), {"moe.layout": "space.layout"})
    for end in ("low", "high"):
        _checked(
            lambda end=end: MoEConfig(split_at=getattr(space.split_at, end)),
            {"moe.split_at": f"space.split_at.{end}"},
        )
    if "shared" in space.layout:
        _validate_shared(cfg)
    for training in space.expert_training:
        _checked(
            lambda training=training: MoEConfig(expert_training=training),
            {"moe.expert_training": "space.expert_training"},
        )
    for views in space.views:
        check_views(views, "space.views")
        for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
            if budget.augment == AUTO:
                continue  # checked again once the probe has chosen (resolved_augment)
            seen = AUGMENT_VIEWS[budget.augment]
            if views > seen:
                raise ConfigError(
                    f"space.views: {views} averages symmetric views the students never trained on "
                    f"({prefix}.augment: {budget.augment} covers {seen}). Use views up to {seen}, or set "
                    f"{prefix}.augment: d4 (all 8)."
                )


def _validate_shared(cfg: SearchConfig) -> None:
    """``layout: shared`` needs one pruned network (expert_init copies) with a stage list reaching
    ``split_at.high`` (checked on the untrained model, built small)."""
    if "teachers" in cfg.space.expert_init:
        raise ConfigError(
            "space.layout: 'shared' splits one pruned network into trunk and experts, but space.expert_init "
            "holds 'teachers' (experts from different networks). Search one of the two, not both."
        )
    try:
        model = cfg.model.spec.build(3, 2, 32, with_checkpoint=False)
    except ConfigError:
        return  # the model section's own check reports it
    stage_count = _checked(lambda: num_stages(model), {"moe.layout": "space.layout"})
    if cfg.space.split_at.high > stage_count - 1:
        raise ConfigError(
            f"space.split_at.high: {cfg.space.split_at.high} is past the last stage the experts can start "
            f"from: {cfg.model.spec.arch} has {stage_count} stages; use 1..{stage_count - 1}."
        )


def _validate_data(data: DataSettings) -> None:
    names = [*dataset_names(), *USER_LAYOUTS]
    if data.dataset not in names:
        raise unknown_name("data.dataset", data.dataset, names)
    if data.dataset == "folder" and not data.root:
        raise ConfigError(
            "data.root: `dataset: folder` needs the folder holding train/<class>/, val/<class>/ and "
            "test/<class>/ images; set data.root (or pass --data-root)."
        )
    if data.dataset == "npz" and not data.path:
        raise ConfigError("data.path: `dataset: npz` needs the .npz file (MedMNIST's layout); set data.path.")
    if data.dataset != "npz" and data.path is not None:
        raise ConfigError(
            f"data.path: {data.path!r} is read only with `dataset: npz`; remove it or set that."
        )
    if data.dataset in USER_LAYOUTS:
        _check_range("data.size", data.size, 8, 1024)
    elif data.dataset == "cifar10":
        if data.size != 32:
            raise ConfigError(f"data.size: {data.size}; CIFAR-10 images are 32 px. Use data.size: 32.")
    elif data.size not in MEDMNIST_SIZES:
        raise ConfigError(
            f"data.size: {data.size} is not a size MedMNIST publishes; use one of "
            f"{', '.join(map(str, MEDMNIST_SIZES))}, or `dataset: npz` / `folder` for your own files (any size)."
        )
    if data.split_seed < 0:
        raise ConfigError(f"data.split_seed: {data.split_seed} must be >= 0.")


def resolved_augment(cfg: SearchConfig, augment: str) -> SearchConfig:
    """``cfg`` with every ``augment: auto`` (baseline, trial, export) replaced by ``augment``, validated again."""
    mapping = cfg.to_dict()
    for section in ("baseline", "trial", "export"):
        if mapping[section]["augment"] == AUTO:
            mapping[section]["augment"] = augment
    return parse_config(mapping)


def parse_config(mapping: Any) -> SearchConfig:
    """Validate a mapping (parsed YAML) into a :class:`SearchConfig`."""
    _check_finite(mapping, "")
    cfg = build(SearchConfig, _early_stop_shorthand(mapping), "")
    _validate(cfg)
    return cfg


def _early_stop_shorthand(mapping: Any) -> Any:
    """``study.early_stop: false`` (or true) is short for ``study.early_stop: {enabled: false}``."""
    study = mapping.get("study") if isinstance(mapping, dict) else None
    if isinstance(study, dict) and isinstance(study.get("early_stop"), bool):
        return {**mapping, "study": {**study, "early_stop": {"enabled": study["early_stop"]}}}
    return mapping


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.get(key)
                lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: the schema refuses it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is written twice in one mapping (first at line {first}); YAML would keep "
                    "only the last one; remove one of them",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


REQUIRED_SECTIONS = ("study", "space")
EXAMPLE_SPACE = "search_spaces/tiny.yaml"


def load_config(path: str | Path, source: str = "--space") -> SearchConfig:
    """Read and validate a YAML search space; ``source`` names where the path came from in messages."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{source}: file {path} does not exist. Pass a YAML file such as search_spaces/bloodmnist.yaml."
        )
    if not path.is_file():
        raise ConfigError(
            f"{source}: {path} is a folder, not a file. Pass a YAML file such as search_spaces/bloodmnist.yaml."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{source}: {path} is not a text file (it holds binary data). Pass a YAML search space such as "
            "search_spaces/bloodmnist.yaml."
        ) from None
    except OSError as error:
        raise ConfigError(
            f"{source}: cannot read {path} ({error.strerror}). Check the path and its permissions."
        ) from None
    try:
        mapping = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}. Fix the file."
        ) from None
    if mapping is None or mapping == {}:
        raise ConfigError(
            f"{source}: {path} is empty (or only comments); a search space needs at least a `study:` section "
            f"(name, trials) and a `space:` section. Start from {EXAMPLE_SPACE}."
        )
    if isinstance(mapping, dict):
        missing = [section for section in REQUIRED_SECTIONS if section not in mapping]
        if missing:
            raise ConfigError(
                f"{path}: no {' or '.join(f'`{section}:`' for section in missing)} section; a search space needs at least `study:` (name, "
                f"trials) and `space:`, so that a study is never run on defaults by mistake. Start from "
                f"{EXAMPLE_SPACE}."
            )
    try:
        return parse_config(mapping)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_config(cfg: SearchConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def stable_hash(mapping: dict) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:12]


SETUP_FORMAT = 2  # how trained models are keyed; models cached under another format are never reused


def setup_fingerprint(cfg: SearchConfig, data_fingerprint: str) -> str:
    """What shapes a trained model besides its configuration, budget and seed: the data's content
    (:attr:`pipelines.data.Dataset.fingerprint`; where it lives does not count), the model (its channel
    multiple sets the pruned shapes), the teachers and the export budget, and the cache format. A saved
    model or full-budget result is reused only under the same fingerprint."""
    settings = parse_config(cfg.to_dict()).to_dict()  # parsed values: 15 and 15.0 epochs are one budget
    data = {key: value for key, value in settings["data"].items() if key not in ("root", "path", "download")}
    return stable_hash(
        {
            "format": SETUP_FORMAT,
            "data": data,
            "content": data_fingerprint,
            "model": cfg.model_identity(),
            **{section: settings[section] for section in ("baseline", "export")},
        }
    )
