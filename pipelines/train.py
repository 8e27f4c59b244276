"""Training, knowledge distillation and evaluation.

One loop serves every stage: the baseline (no teacher), fine-tuning after pruning (distillation from
the fp32 teacher), MoE training (plus the MoE's load-balancing loss) and NNI's QAT (NNI passes its own
optimizer and patched training step in).

``TrainConfig.precision: bf16`` runs each forward pass under CPU autocast (bfloat16 convolutions and
matmuls, fp32 weights, optimizer and loss) on channels-last batches, which oneDNN executes on AMX or
AVX512-BF16 units (speed: ``python -m search.benchmarks.train_step``). Evaluation, calibration
and every reported accuracy stay fp32. On a CPU without native bfloat16 the same code runs, emulated and
slower (:func:`native_bf16` tells).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data import AUGMENTS as GROUP_AUGMENTS
from pipelines.data import Split, symmetry_views
from pipelines.data_layouts import stratified_holdout
from pipelines.errors import CompressionError, ConfigError, unknown_name
from pipelines.symmetry_probe import ProbeConfig, SymmetryProbe, probe_symmetries

log = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "TrainReport",
    "train",
    "evaluate",
    "predict_logits",
    "distillation_loss",
    "ensemble_logits",
    "native_bf16",
    "step_loss",
    "PRECISIONS",
    "AUGMENTS",
]

PRECISIONS = ("fp32", "bf16")
# A symmetry group of pipelines.data.AUGMENTS, or "auto": the symmetry probe picks the group before training.
AUGMENTS = (*GROUP_AUGMENTS, "auto")
PROBE_HOLDOUT = 0.2  # of the training split, scored by the probe when train() resolves "auto" itself


@dataclass(frozen=True)
class TrainConfig:
    """How to train one stage. ``kd_alpha`` weighs distillation against the hard labels (0 = no KD)."""

    epochs: float = 1.0
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.1
    # none | crop | hflip | flips | d4 | auto (AUGMENTS; auto: pipelines.symmetry_probe picks)
    augment: str = "flips"
    schedule: str = "onecycle"  # onecycle | cosine | constant
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    subset: float = 1.0  # fraction of the training split (multi-fidelity trials use < 1)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16: autocast forward passes on channels-last batches (module doc)

    def __post_init__(self) -> None:
        ranges = {  # field: (ok, the range in words)
            "epochs": (0 < self.epochs <= 1000, "> 0 and <= 1000"),
            "lr": (self.lr > 0, "> 0"),
            "batch_size": (self.batch_size >= 2, ">= 2 (BatchNorm cannot train on one sample)"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "kd_alpha": (0 <= self.kd_alpha <= 1, "in [0, 1]"),
            "kd_temperature": (self.kd_temperature > 0, "> 0"),
            "subset": (0.01 <= self.subset <= 1, "in [0.01, 1]"),
        }
        for field_name, (ok, allowed) in ranges.items():
            if not ok:
                raise ConfigError(
                    f"train.{field_name}: {getattr(self, field_name)!r} is out of range; use a value {allowed}."
                )
        if self.augment not in AUGMENTS:
            raise unknown_name("train.augment", self.augment, AUGMENTS)
        if self.precision not in PRECISIONS:
            raise unknown_name("train.precision", self.precision, PRECISIONS)
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(
                f"train.schedule: unknown value {self.schedule!r}. Valid values: constant, cosine, onecycle."
            )

    def replace(self, **changes) -> TrainConfig:
        return TrainConfig(**{**asdict(self), **changes})


@dataclass
class TrainReport:
    steps: int
    seconds: float  # of this call (a resumed run counts only the steps it trained)
    final_loss: float
    resumed_at: int = 0  # the step a ``checkpoint`` resumed from (0: trained from the start)
    augment: str = ""  # the augmentation trained with (``auto`` resolved)
    probe: SymmetryProbe | None = None  # the probe that resolved ``augment: auto``, if it ran here


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's KD term: KL(teacher || student) at ``temperature``, scaled by T^2."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
        )
        * temperature**2
    )


def _loss(batch, model: nn.Module, teacher: nn.Module | None, cfg: TrainConfig) -> torch.Tensor:
    images, labels, *targets = batch  # a third element: precomputed teacher logits (ensemble_logits)
    logits = model(images).float()  # the loss in fp32 also under bf16 autocast
    loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if (teacher is not None or targets) and cfg.kd_alpha > 0:
        if targets:
            teacher_logits = targets[0]
        else:
            with torch.no_grad():
                teacher_logits = teacher(images).float()
        loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * distillation_loss(
            logits, teacher_logits, cfg.kd_temperature
        )
    auxiliary = getattr(model, "auxiliary_loss", None)
    if callable(auxiliary):
        loss = loss + auxiliary(labels)
    return loss


def make_step(teacher: nn.Module | None, cfg: TrainConfig) -> Callable:
    """The training step ``step(batch, model) -> loss`` (NNI's evaluators take this form)."""
    if teacher is not None:
        teacher.eval()

    def step(batch, model: nn.Module) -> torch.Tensor:
        return _loss(batch, model, teacher, cfg)

    return step


def step_loss(step: Callable, batch, model: nn.Module, precision: str) -> torch.Tensor:
    """``step(batch, model)`` at ``precision``: with bf16, under CPU autocast on a channels-last batch."""
    if precision != "bf16":
        return step(batch, model)
    images, *rest = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return step((images.contiguous(memory_format=torch.channels_last), *rest), model)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where ``precision: bf16`` pays."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=0.25,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def train(
    model: nn.Module,
    data: Split,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    step: Callable | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int, float | None], None] | None = None,
    val: Split | None = None,
    checkpoint: Path | None = None,
) -> TrainReport:
    """Train ``model`` in place on ``data`` for ``cfg.epochs`` (fractions allowed).

    Distillation targets come from ``data.teacher_logits`` when the split carries them (see
    :func:`ensemble_logits`; the teacher is then not run per step), else from ``teacher`` on each batch.

    ``checkpoint``: a file where the model, optimizer, schedule and position are saved after every epoch,
    so that a run killed or interrupted (Ctrl-C) resumes there, with the same result as an uninterrupted
    one. It is read only if it was written by the same ``cfg`` on a split of the same size, else training
    starts over; the caller deletes it once the model is kept.

    ``on_epoch(epoch, epochs, val_accuracy)`` is called after each epoch (the last may be a fraction),
    with the top-1 accuracy on ``val`` when given (else None). That evaluation changes neither the weights
    nor the random stream of training: the same seed trains the same model with or without it.

    ``cfg.augment == "auto"`` runs the symmetry probe (:mod:`pipelines.symmetry_probe`) on a stratified
    holdout of ``data`` first; the report carries its record. A caller that trains several models on one
    dataset resolves it once instead (``resolve_augment``) and passes the chosen group.

    Raises :class:`CompressionError` when the loss becomes NaN/inf (the trial fails with that reason).
    """
    torch.manual_seed(cfg.seed)
    split = data.subset(cfg.subset, seed=cfg.seed)
    if len(split) < 2:
        raise ConfigError(
            f"train: the training split has {len(split)} sample(s); need at least 2 (BatchNorm)."
        )
    probe = None
    if cfg.augment == "auto":
        probe = _probe_split(split, cfg.seed)
        log.info("train: %s", probe.summary())
        cfg = cfg.replace(augment=probe.augment)
        torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
    total_steps = max(1, int(round(cfg.epochs * steps_per_epoch)))
    total_epochs = math.ceil(total_steps / steps_per_epoch)
    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    scheduler = _scheduler(optimizer, cfg, total_steps)
    step = step or make_step(teacher, cfg)
    with_targets = split.teacher_logits is not None and cfg.kd_alpha > 0
    identity = json.dumps(  # what a checkpoint must have been written by to be resumed
        {"config": asdict(cfg), "samples": len(split), "total_steps": total_steps},
        sort_keys=True,
        default=str,
    )
    done, epoch, loss_value = _resume(checkpoint, identity, model, optimizer, scheduler)
    resumed_at = done
    model.train()
    started = time.perf_counter()
    while done < total_steps:
        for batch in split.batches(
            cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            seed=cfg.seed + epoch,
            with_targets=with_targets,
        ):
            if len(batch[1]) < 2:  # BatchNorm cannot train on a single sample
                continue
            loss = step_loss(step, batch, model, cfg.precision)
            if not torch.isfinite(loss):
                raise CompressionError(
                    f"training diverged: loss became {loss.item()} at step {done}. Lower the learning rate."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_value = float(loss.detach())
            done += 1
            if on_step is not None:
                on_step(done, total_steps)
            if done >= total_steps:
                break
        epoch += 1
        if checkpoint is not None and done < total_steps:
            _save_progress(checkpoint, identity, model, optimizer, scheduler, (done, epoch, loss_value))
        if on_epoch is not None:
            on_epoch(epoch, max(epoch, total_epochs), _val_accuracy(model, val))
    model.eval()
    return TrainReport(
        steps=done,
        seconds=time.perf_counter() - started,
        final_loss=loss_value,
        resumed_at=resumed_at,
        augment=cfg.augment,
        probe=probe,
    )


def _val_accuracy(model: nn.Module, val: Split | None) -> float | None:
    """Top-1 on ``val`` in the middle of training, leaving the model in training mode and the random
    stream where it was (evaluation runs in eval mode: BatchNorm statistics are not updated)."""
    if val is None or len(val) == 0:
        return None
    state = torch.get_rng_state()
    accuracy = evaluate(model, val)
    torch.set_rng_state(state)
    model.train()
    return accuracy


def _probe_split(split: Split, seed: int) -> SymmetryProbe:
    """The symmetry probe trained on most of ``split`` and scored on a stratified holdout of it."""
    kept, held = stratified_holdout(split.labels.numpy(), PROBE_HOLDOUT, seed)
    if len(held) == 0:
        raise ConfigError(
            "train.augment: auto needs at least 2 samples of some class to probe; pick a group."
        )
    fit = Split(split.images[torch.from_numpy(kept)], split.labels[torch.from_numpy(kept)])
    scored = Split(split.images[torch.from_numpy(held)], split.labels[torch.from_numpy(held)])
    classes = int(split.labels.max()) + 1
    return probe_symmetries(fit, scored, classes, ProbeConfig(seed=seed))


def _save_progress(path: Path, identity: str, model, optimizer, scheduler, position: tuple) -> None:
    """One epoch's state, written whole then renamed (a kill mid-write leaves the previous epoch's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "identity": identity,
            "position": list(position),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": torch.get_rng_state(),
        },
        staging,
    )
    staging.replace(path)


def _resume(path: Path | None, identity: str, model, optimizer, scheduler) -> tuple[int, int, float]:
    """(steps done, epoch, last loss) from ``path`` when it holds this run's progress, else a fresh start."""
    if path is None or not Path(path).exists():
        return 0, 0, float("nan")
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    try:
        saved = torch.load(path, weights_only=True)
        if saved["identity"] != identity:
            log.warning("train: %s was saved by another training setup; starting over", path)
            return 0, 0, float("nan")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        done, epoch, loss_value = saved["position"]
    except Exception as error:  # a truncated or foreign file: the epochs it held are retrained
        log.warning("train: cannot resume from %s (%s); starting over", path, error)
        model.load_state_dict(fresh)  # a half-applied load leaves nothing behind
        optimizer.state.clear()
        return 0, 0, float("nan")
    log.info("train: resumed from %s at step %d (epoch %d)", path, done, epoch)
    return int(done), int(epoch), float(loss_value)


@torch.no_grad()
def predict_logits(model: nn.Module, data: Split, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return (
        torch.cat([model(images) for images, _ in data.batches(batch_size)]) if len(data) else torch.empty(0)
    )


@torch.no_grad()
def ensemble_logits(
    teacher: nn.Module,
    data: Split,
    augment: str,
    batch_size: int = 512,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The teacher's logits on every sample of ``data``, averaged over the symmetries of ``augment``
    (:func:`pipelines.data.symmetry_views`: 8 views for d4). ``on_batch(done, total)`` follows each batch.

    Distilling from these instead of the teacher's output on each augmented batch gives targets that do
    not change when the student sees a flipped or transposed image, from a test-time-augmented teacher
    that is more accurate than the teacher alone; and a training step no longer runs the teacher.
    """
    teacher.eval()
    total = math.ceil(len(data) / batch_size)
    outputs = []
    for index, (images, _) in enumerate(data.batches(batch_size)):
        outputs.append(torch.stack([teacher(view) for view in symmetry_views(images, augment)]).mean(dim=0))
        if on_batch is not None:  # ``on_batch(done, total)``: a long pass reports its progress
            on_batch(index + 1, total)
    return torch.cat(outputs)


def evaluate(model: nn.Module, data: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    if len(data) == 0:
        raise ConfigError("evaluate: the split is empty.")
    predictions = predict_logits(model, data, batch_size).argmax(dim=1)
    return float((predictions == data.labels).float().mean())
