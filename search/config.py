"""Search spaces are data: a YAML file validated by one schema into frozen dataclasses.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the field (as a
dotted path), the value and the fix. ``suggest`` turns the validated space into Optuna suggestions,
keeping numbers numeric (``suggest_float(low, high, step)``) so samplers see their order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.compress.prune import PRUNERS
from pipelines.compress.quantize import BITS, QUANTIZER_METHODS
from pipelines.data import AUGMENT_VIEWS, AUGMENTS, dataset_names
from pipelines.errors import ConfigError, unknown_name
from pipelines.hybrid import EXPERT_INITS
from pipelines.models import model_names
from pipelines.moe import ROUTINGS, VIEWS
from pipelines.train import PRECISIONS
from search.record import TrialRecord

__all__ = [
    "SAMPLERS",
    "SearchConfig",
    "load_space",
    "parse_space",
    "dump_space",
    "suggest",
    "baseline_params",
    "setup_fingerprint",
]

SAMPLERS: tuple[str, ...] = ("tpe", "nsga2", "gp", "random")
KD_TARGETS: tuple[str, ...] = ("online", "ensemble")  # see TrialContext.training_data


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
class StudySettings:
    name: str = "hycomp"
    trials: int = 8
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    storage: str | None = None  # default: sqlite:///results/<name>/study.db
    enqueue_baseline: bool = True
    timeout_minutes: float | None = None


@dataclass(frozen=True)
class DataSettings:
    dataset: str = "bloodmnist"
    root: str | None = None
    size: int = 28
    download: bool = False
    verify_md5: bool = True


@dataclass(frozen=True)
class ModelSettings:
    arch: str = "resnet20"
    width: float = 1.0
    channel_multiple: int = 8  # pruned layers keep multiples of this many channels (1 = exact ratio)


@dataclass(frozen=True)
class BaselineSettings:
    """Training of the fp32 teacher (cached, keyed by dataset, arch and these settings)."""

    epochs: float = 15
    lr: float = 0.1
    batch_size: int = 128
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    augment: str = "flips"  # none | flips | d4 (crop + symmetries; pipelines.data.AUGMENTS)
    precision: str = "fp32"  # fp32 | bf16 (pipelines.train: autocast training, 2.5x faster on AMX CPUs)
    seed: int = 0
    teachers: int = (
        1  # students distil from this many teachers (seeds seed, seed+1, ...); the first is pruned
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
    augment: str = "flips"  # none | flips | d4
    precision: str = "fp32"  # fp32 | bf16 (pipelines.train)
    kd_targets: str = (
        "online"  # online: teacher on each batch | ensemble: teacher averaged over augment's views
    )


@dataclass(frozen=True)
class Space:
    sparsity: FloatRange = field(default_factory=lambda: FloatRange(0.3, 0.8, 0.05))
    pruner: tuple[str, ...] = ("l1", "l2", "fpgm")
    bits: tuple[int, ...] = (4, 6, 8)
    quantizer: tuple[str, ...] = ("qat",)  # qat | ptq
    num_experts: IntRange = field(default_factory=lambda: IntRange(1, 4))
    top_k: IntRange = field(default_factory=lambda: IntRange(1, 2))
    gate_size: tuple[int, ...] = (4, 8, 16)
    routing: tuple[str, ...] = ("class-groups",)  # class-groups | learned (see pipelines/moe.py)
    expert_init: tuple[str, ...] = ("copies",)  # copies | teachers (see pipelines/hybrid.py)
    views: tuple[int, ...] = (
        1,
    )  # test-time symmetry views averaged per input: 1 | 2 | 4 | 8 (pipelines/moe.py)


@dataclass(frozen=True)
class MeasureSettings:
    latency_threads: int = 1
    latency_repeats: int = 30
    int8_engine: bool = True  # trials are timed on ONNX Runtime int8 (fp32 for 32-bit trials)


@dataclass(frozen=True)
class Constraints:
    max_latency_ms: float | None = None
    max_size_kb: float | None = None
    min_accuracy: float | None = None
    max_mmacs: float | None = None


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
        return _plain(asdict(self))

    def replace(self, **sections: Any) -> SearchConfig:
        """A copy with sections updated from plain mappings, re-validated (``replace(study={"trials": 3})``)."""
        merged = self.to_dict()
        for section, values in sections.items():
            if isinstance(merged.get(section), dict) and isinstance(values, dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
        return parse_space(merged)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------- schema


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _convert(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{path}: null is not allowed here.")
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, path)
    if origin is tuple:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(
                f"{path}: expected a non-empty list, got {value!r}. Write e.g. `{path.split('.')[-1]}: [a, b]`."
            )
        return tuple(_convert(item, args[0], f"{path}[{index}]") for index, item in enumerate(value))
    if annotation is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(annotation)}")  # pragma: no cover


def _build(cls: type, mapping: Any, path: str) -> Any:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path or 'space file'}: expected a mapping of keys, got {mapping!r}.")
    hints = typing.get_type_hints(cls)
    names = [item.name for item in dataclasses.fields(cls)]
    for key in mapping:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"{where}: unknown key. Valid keys{' of ' + path if path else ''}: {', '.join(names)}."
            )
    values = {
        key: _convert(value, hints[key], f"{path}.{key}" if path else key) for key, value in mapping.items()
    }
    return cls(**values)


def _check_range(path: str, value: Any, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{path}: {value} is out of range; use a value in [{low}, {high}].")


def _validate(cfg: SearchConfig) -> None:
    space = cfg.space
    if cfg.study.trials < 1:
        raise ConfigError(f"study.trials: {cfg.study.trials} must be a positive number of trials (e.g. 8).")
    if not cfg.study.name or any(char in cfg.study.name for char in '/\\:*?"<>| '):
        raise ConfigError(
            f"study.name: {cfg.study.name!r} must be a non-empty name without spaces or path characters."
        )
    if cfg.study.sampler.name not in SAMPLERS:
        raise unknown_name("study.sampler.name", cfg.study.sampler.name, SAMPLERS)
    if cfg.data.dataset not in dataset_names():
        raise unknown_name("data.dataset", cfg.data.dataset, dataset_names())
    if cfg.data.size not in (28, 32, 64, 128, 224):
        raise ConfigError(
            f"data.size: {cfg.data.size} is not a MedMNIST size; use 28, 64, 128 or 224 (32 for CIFAR-10)."
        )
    if cfg.model.arch not in model_names():
        raise unknown_name("model.arch", cfg.model.arch, model_names())
    _check_range("model.width", cfg.model.width, 0.0625, 8.0)
    _check_range("model.channel_multiple", cfg.model.channel_multiple, 1, 64)
    if cfg.baseline.augment not in AUGMENTS:
        raise unknown_name("baseline.augment", cfg.baseline.augment, AUGMENTS)
    if cfg.baseline.precision not in PRECISIONS:
        raise unknown_name("baseline.precision", cfg.baseline.precision, PRECISIONS)
    for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
        if budget.augment not in AUGMENTS:
            raise unknown_name(f"{prefix}.augment", budget.augment, AUGMENTS)
        if budget.precision not in PRECISIONS:
            raise unknown_name(f"{prefix}.precision", budget.precision, PRECISIONS)
        if budget.kd_targets not in KD_TARGETS:
            raise unknown_name(f"{prefix}.kd_targets", budget.kd_targets, KD_TARGETS)
        _check_range(f"{prefix}.subset", budget.subset, 0.01, 1.0)
        _check_range(f"{prefix}.kd_alpha", budget.kd_alpha, 0.0, 1.0)
        for name in ("finetune_epochs", "moe_epochs", "qat_epochs", "gate_epochs"):
            _check_range(f"{prefix}.{name}", getattr(budget, name), 0.0, 1000.0)
        if budget.qat_epochs <= 0:
            raise ConfigError(
                f"{prefix}.qat_epochs: {budget.qat_epochs} must be > 0 (QAT needs steps to learn scales)."
            )
        _check_range(f"{prefix}.lr", budget.lr, 1e-6, 10.0)
    _check_range("baseline.epochs", cfg.baseline.epochs, 0.01, 1000.0)
    _check_range("baseline.teachers", cfg.baseline.teachers, 1, 8)
    if cfg.baseline.teachers > 1:
        for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
            if budget.kd_targets != "ensemble":
                raise ConfigError(
                    f"{prefix}.kd_targets: {budget.kd_targets!r} distils from one teacher, but baseline.teachers "
                    f"is {cfg.baseline.teachers}. Set {prefix}.kd_targets: ensemble (the teachers' averaged "
                    "logits) or baseline.teachers: 1."
                )
    sparsity = space.sparsity
    _check_range("space.sparsity.low", sparsity.low, 0.0, 0.95)
    _check_range("space.sparsity.high", sparsity.high, 0.0, 0.95)
    if sparsity.low > sparsity.high:
        raise ConfigError(f"space.sparsity: low {sparsity.low} > high {sparsity.high}; swap them.")
    if sparsity.step is not None and sparsity.step <= 0:
        raise ConfigError(f"space.sparsity.step: {sparsity.step} must be > 0 or null.")
    for pruner in space.pruner:
        if pruner not in PRUNERS:
            raise unknown_name("space.pruner", pruner, PRUNERS)
    for bits in space.bits:
        if bits not in BITS:
            raise ConfigError(
                f"space.bits: {bits} is not supported; use values from {', '.join(map(str, BITS))}."
            )
    for name, lowest, highest in (("num_experts", 1, 16), ("top_k", 1, 16)):
        rng = getattr(space, name)
        _check_range(f"space.{name}.low", rng.low, lowest, highest)
        _check_range(f"space.{name}.high", rng.high, lowest, highest)
        if rng.low > rng.high:
            raise ConfigError(f"space.{name}: low {rng.low} > high {rng.high}; swap them.")
    if space.top_k.low > space.num_experts.high:
        raise ConfigError(
            f"space.top_k.low: {space.top_k.low} exceeds space.num_experts.high ({space.num_experts.high}); "
            "top_k must not exceed the number of experts. Lower top_k.low or raise num_experts.high."
        )
    for method in space.quantizer:
        if method not in QUANTIZER_METHODS:
            raise unknown_name("space.quantizer", method, QUANTIZER_METHODS)
    for routing in space.routing:
        if routing not in ROUTINGS:
            raise unknown_name("space.routing", routing, ROUTINGS)
    for init in space.expert_init:
        if init not in EXPERT_INITS:
            raise unknown_name("space.expert_init", init, EXPERT_INITS)
    if "teachers" in space.expert_init and cfg.baseline.teachers < 2:
        raise ConfigError(
            f"space.expert_init: 'teachers' prunes each expert from a different teacher, but baseline.teachers "
            f"is {cfg.baseline.teachers}. Set baseline.teachers: 2 (or more), or remove 'teachers' from "
            "space.expert_init."
        )
    for gate_size in space.gate_size:
        _check_range("space.gate_size", gate_size, 1, 256)
    for views in space.views:
        if views not in VIEWS:
            raise ConfigError(
                f"space.views: {views} is not a number of test-time views; use values from "
                f"{', '.join(map(str, VIEWS))}."
            )
        for prefix, budget in (("trial", cfg.trial), ("export", cfg.export)):
            seen = AUGMENT_VIEWS[budget.augment]
            if views > seen:
                raise ConfigError(
                    f"space.views: {views} averages symmetric views the students never trained on "
                    f"({prefix}.augment: {budget.augment} covers {seen}). Use views up to {seen}, or set "
                    f"{prefix}.augment: d4 (all 8)."
                )
    _check_range("measure.latency_threads", cfg.measure.latency_threads, 1, 256)
    _check_range("measure.latency_repeats", cfg.measure.latency_repeats, 1, 100000)
    for name in ("max_latency_ms", "max_size_kb", "max_mmacs"):
        value = getattr(cfg.constraints, name)
        if value is not None and value <= 0:
            raise ConfigError(f"constraints.{name}: {value} must be > 0 (or null for no limit).")
    if cfg.constraints.min_accuracy is not None:
        _check_range("constraints.min_accuracy", cfg.constraints.min_accuracy, 0.0, 1.0)


def parse_space(mapping: Any) -> SearchConfig:
    """Validate a mapping (parsed YAML) into a :class:`SearchConfig`."""
    cfg = _build(SearchConfig, mapping, "")
    _validate(cfg)
    return cfg


def load_space(path: str | Path) -> SearchConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"--space: file {path} does not exist. Pass a YAML file such as search_spaces/bloodmnist.yaml."
        )
    try:
        mapping = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}. Fix the syntax."
        ) from None
    try:
        return parse_space(mapping)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_space(cfg: SearchConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def stable_hash(mapping: dict) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:12]


def setup_fingerprint(cfg: SearchConfig) -> str:
    """What shapes a full-budget model besides its trial configuration and seed: dataset, model (its channel
    multiple sets the pruned shapes), teachers and the export budget. Where the data lives does not count.
    A saved full-budget result is reused only under the same fingerprint."""
    settings = parse_space(cfg.to_dict()).to_dict()  # parsed values: 15 and 15.0 epochs are one budget
    data = {key: value for key, value in settings["data"].items() if key not in ("root", "download")}
    return stable_hash(
        {"data": data, **{section: settings[section] for section in ("model", "baseline", "export")}}
    )


# --------------------------------------------------------------------------------------------- optuna


GATE_ONLY = ("gate_size", "routing", "expert_init")  # parameters a single expert (no gate) ignores
INFERENCE_ONLY = ("views",)  # parameters that change inference only: a trained model is measured again


def suggest(trial: Any, space: Space) -> dict:
    """Sample one configuration. ``top_k`` is drawn from its own fixed range and then clipped to the
    sampled number of experts (a fixed range keeps the samplers' model of the space consistent); the
    value actually used is recorded as ``effective_top_k``.

    The enqueued reference trial (user attribute ``reference``) may hold values outside the space
    (sparsity 0, fp32): Optuna accepts fixed numeric values out of range, but not categorical values
    outside their choices, so a reference bit-width outside ``space.bits`` is used without suggesting it.
    """
    sparsity = space.sparsity
    params = {
        # rounded: a stepped float comes back as e.g. 0.6000000000000001, which reports would show
        "sparsity": round(
            trial.suggest_float("sparsity", sparsity.low, sparsity.high, step=sparsity.step), 6
        ),
        "pruner": trial.suggest_categorical("pruner", list(space.pruner)),
    }
    if TrialRecord.of(trial).reference and REFERENCE_BITS not in space.bits:
        params["bits"] = REFERENCE_BITS
    else:
        params["bits"] = trial.suggest_categorical("bits", list(space.bits))
    params["quantizer"] = trial.suggest_categorical("quantizer", list(space.quantizer))
    params["num_experts"] = trial.suggest_int(
        "num_experts", space.num_experts.low, space.num_experts.high, step=space.num_experts.step
    )
    params["top_k"] = trial.suggest_int("top_k", space.top_k.low, space.top_k.high, step=space.top_k.step)
    params["gate_size"] = trial.suggest_categorical("gate_size", list(space.gate_size))
    params["routing"] = trial.suggest_categorical("routing", list(space.routing))
    if space.expert_init != ("copies",):  # a one-choice space adds no parameter: older studies still match
        params["expert_init"] = trial.suggest_categorical("expert_init", list(space.expert_init))
    if space.views != (1,):
        params["views"] = trial.suggest_categorical("views", list(space.views))
    params["effective_top_k"] = min(params["top_k"], params["num_experts"])
    return params


REFERENCE_BITS = 32


def baseline_params(space: Space) -> dict:
    """The uncompressed reference point enqueued first: no pruning, fp32 weights, one expert."""
    params = {
        "sparsity": 0.0,
        "pruner": space.pruner[0],
        "bits": REFERENCE_BITS,
        "num_experts": 1,
        "top_k": 1,
        "gate_size": min(space.gate_size),
        "routing": space.routing[0],
        "quantizer": space.quantizer[0],
    }
    if space.expert_init != ("copies",):
        params["expert_init"] = space.expert_init[0]
    if space.views != (1,):
        params["views"] = min(space.views)
    if REFERENCE_BITS not in space.bits:
        del params["bits"]  # not a valid categorical choice: suggest() fills it in for the reference
    return params
