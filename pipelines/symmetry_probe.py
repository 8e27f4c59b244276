"""Which symmetries keep a dataset's labels: the probe behind ``augment: auto``.

A small net is trained briefly on a subset of train with random crops and no symmetry, then scored on
validation images as they are and under each of the 7 other symmetries of the square. A symmetry that
costs more than :data:`PROBE_MARGIN` of accuracy, or of class-balanced accuracy (mean recall per class,
so that a small class the symmetry scrambles is not averaged away), changes what an image shows (a
mirrored digit, a left kidney turned right) and is dropped. A validation split smaller than
``ProbeConfig.val_samples`` is topped up with training images the probe net did not train on, so a
small dataset's verdict does not hang on a few dozen images. The augmentation is the largest group whose every element was
kept: ``d4``, ``flips``, ``hflip``, else ``crop``; groups are closed, so no rejected view comes back as
a composition of kept ones. A probe whose net barely beats the majority class decides nothing and
picks ``crop``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data import AUGMENT_VIEWS, AUGMENTS, Dataset, Split, symmetry_views
from pipelines.data_layouts import stratified_holdout
from pipelines.errors import ConfigError

__all__ = [
    "PROBE_MARGIN",
    "D4_ELEMENTS",
    "ProbeConfig",
    "SymmetryProbe",
    "probe_symmetries",
    "resolve_augment",
]

PROBE_MARGIN = 0.03  # accuracy a symmetry may cost before it is dropped (3 points)
# The 8 symmetries of the square, in pipelines.data.symmetry_views' d4 order.
D4_ELEMENTS = ("identity", "hflip", "vflip", "rot180", "transpose", "rot90", "rot270", "antitranspose")
_GROUPS = ("d4", "flips", "hflip")  # largest first; each is the first AUGMENT_VIEWS[name] elements


@dataclass(frozen=True)
class ProbeConfig:
    """How long the probe trains. The defaults take seconds on one core for 28 px images."""

    train_samples: int = 6000  # a class-stratified subset of train
    val_samples: int = 3000
    epochs: float = 4.0
    max_size: int = 32  # larger images are resized down first (resizing a square commutes with D4)
    width: int = 24
    batch_size: int = 64
    lr: float = 0.05
    margin: float = PROBE_MARGIN
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "train_samples": self.train_samples >= 2,
            "val_samples": self.val_samples >= 1,
            "epochs": self.epochs > 0,
            "max_size": self.max_size >= 8,
            "width": self.width >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0,
            "margin": 0 <= self.margin < 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"probe.{name}: value {getattr(self, name)!r} is out of range.")


@dataclass(frozen=True)
class SymmetryProbe:
    """What the probe measured and chose."""

    accuracy: float  # on the validation images as they are
    view_accuracy: dict[str, float]  # per symmetry (D4_ELEMENTS without identity)
    margin: float
    kept: tuple[str, ...]  # symmetries that cost at most ``margin`` in both accuracies
    augment: str  # the chosen augmentation: d4 | flips | hflip | crop
    majority: float  # accuracy of always answering the most frequent class
    conclusive: bool  # False: the net did not beat ``majority`` by 2 margins; ``augment`` is crop
    train_samples: int
    val_samples: int  # validation images scored, training images the net did not see included
    seconds: float
    config: ProbeConfig = field(default_factory=ProbeConfig)
    balanced_accuracy: float = 0.0  # mean per-class recall on the validation images as they are
    view_balanced_accuracy: dict[str, float] = field(default_factory=dict)  # per symmetry

    def summary(self) -> str:
        """One line for a log: the choice, then each symmetry's accuracy / balanced accuracy (kept ones
        marked +)."""
        views = ", ".join(
            f"{'+' if name in self.kept else '-'}{name} {accuracy:.3f}/{self.view_balanced_accuracy[name]:.3f}"
            for name, accuracy in self.view_accuracy.items()
        )
        verdict = "" if self.conclusive else " (inconclusive: the probe net barely beats the majority class)"
        return (
            f"augment auto -> {self.augment}{verdict}: probe accuracy / balanced accuracy "
            f"{self.accuracy:.3f}/{self.balanced_accuracy:.3f}, margin "
            f"{self.margin:.3f}; {views} ({self.train_samples} train / {self.val_samples} val images, "
            f"{self.seconds:.1f} s)"
        )

    def to_dict(self) -> dict:
        """JSON-ready, for the study's resolved config."""
        record = asdict(self)
        record["kept"] = list(self.kept)
        return record


class _ProbeNet(nn.Module):
    """Three conv blocks and a linear layer on a 4x4 grid: small, and it sees where things are."""

    def __init__(self, channels: int, classes: int, width: int) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width * 16, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


def _shrunk(split: Split, size: int) -> Split:
    if split.images.shape[-1] <= size:
        return split
    images = F.interpolate(
        split.images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return Split(images, split.labels)


def _fraction(split: Split, count: int) -> float:
    return min(1.0, count / max(1, len(split)))


def _train_probe_net(train: Split, classes: int, config: ProbeConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    model = _ProbeNet(int(train.images.shape[1]), classes, config.width)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = max(1, int(round(config.epochs * steps_per_epoch)))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total, pct_start=0.25
    )
    model.train()
    done, epoch = 0, 0
    while done < total:
        for images, labels in train.batches(
            config.batch_size, shuffle=True, augment="crop", seed=config.seed + epoch
        ):
            if len(labels) < 2:  # BatchNorm cannot train on one sample
                continue
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done >= total:
                break
        epoch += 1
    return model.eval()


@torch.no_grad()
def _view_accuracies(
    model: nn.Module, val: Split, classes: int, batch_size: int = 512
) -> tuple[list[float], list[float]]:
    """Accuracy and class-balanced accuracy on each of the 8 D4 views of ``val`` (D4_ELEMENTS order)."""
    correct = torch.zeros(len(D4_ELEMENTS), classes)  # per view and true class
    for images, labels in val.batches(batch_size):
        for index, view in enumerate(symmetry_views(images, "d4")):
            hits = (model(view).argmax(dim=1) == labels).float()
            correct[index].index_add_(0, labels, hits)
    counts = torch.bincount(val.labels, minlength=classes).float()
    present = counts > 0
    accuracy = correct.sum(dim=1) / len(val)
    balanced = (correct[:, present] / counts[present]).mean(dim=1)
    return accuracy.tolist(), balanced.tolist()


def _scored_images(train: Split, val: Split, config: ProbeConfig) -> tuple[Split, Split]:
    """(what the probe net trains on, what it is scored on): a stratified subset of ``train``, and ``val``
    topped up to ``config.val_samples`` with training images outside that subset when it is smaller."""
    labels = train.labels.numpy()
    shortfall = config.val_samples - len(val)
    train_count = min(config.train_samples, len(train))
    if shortfall > 0 and train_count > len(train) - shortfall:
        # Every training image would be trained on: keep back up to a fifth of them for scoring.
        train_count = max(train_count - shortfall, len(train) - len(train) // 5)
    held_out = 1.0 - train_count / len(train)
    if held_out <= 0:
        return train, val
    fit_index, spare_index = stratified_holdout(labels, held_out, config.seed)
    fit = Split(train.images[torch.from_numpy(fit_index)], train.labels[torch.from_numpy(fit_index)])
    if shortfall <= 0 or len(spare_index) == 0:
        return fit, val
    generator = np.random.default_rng(config.seed + 1)
    extra = torch.from_numpy(np.sort(generator.permutation(spare_index)[:shortfall]))
    scored = Split(torch.cat([val.images, train.images[extra]]), torch.cat([val.labels, train.labels[extra]]))
    return fit, scored


def probe_symmetries(
    train: Split, val: Split, num_classes: int, config: ProbeConfig | None = None
) -> SymmetryProbe:
    """Train the probe net on ``train`` (crops, no symmetry) and keep the symmetries that cost at most
    ``config.margin`` of accuracy on ``val``. Images must be square.

    Example: ``probe_symmetries(data.train, data.val, data.num_classes).augment`` -> ``"d4"``."""
    config = config or ProbeConfig()
    started = time.perf_counter()
    if train.images.shape[-1] != train.images.shape[-2]:
        raise ConfigError("augment: auto needs square images (transposes); pick crop, hflip or flips.")
    fit, scored = _scored_images(train, val, config)
    train_subset = _shrunk(fit, config.max_size)
    val_subset = _shrunk(
        scored.subset(_fraction(scored, config.val_samples), seed=config.seed), config.max_size
    )
    model = _train_probe_net(train_subset, num_classes, config)
    (identity, *others), (balanced, *balanced_others) = _view_accuracies(model, val_subset, num_classes)
    view_accuracy = dict(zip(D4_ELEMENTS[1:], others, strict=True))
    view_balanced = dict(zip(D4_ELEMENTS[1:], balanced_others, strict=True))
    kept = tuple(
        name
        for name in D4_ELEMENTS[1:]
        if max(identity - view_accuracy[name], balanced - view_balanced[name]) <= config.margin
    )
    majority = float(torch.bincount(val_subset.labels).max()) / len(val_subset)
    conclusive = identity - majority >= 2 * config.margin
    augment = "crop"
    if conclusive:
        for group in _GROUPS:
            if all(name in kept for name in D4_ELEMENTS[1 : AUGMENT_VIEWS[group]]):
                augment = group
                break
    return SymmetryProbe(
        accuracy=identity,
        view_accuracy=view_accuracy,
        margin=config.margin,
        kept=kept,
        augment=augment,
        majority=majority,
        conclusive=conclusive,
        train_samples=len(train_subset),
        val_samples=len(val_subset),
        seconds=time.perf_counter() - started,
        config=config,
        balanced_accuracy=balanced,
        view_balanced_accuracy=view_balanced,
    )


def resolve_augment(
    augment: str, data: Dataset, config: ProbeConfig | None = None
) -> tuple[str, SymmetryProbe | None]:
    """``augment`` itself when it names a group, else (``"auto"``) the probe's choice on ``data`` and its
    record. The search layer calls this once per dataset and trains with the returned name."""
    if augment != "auto":
        if augment not in AUGMENTS:
            raise ConfigError(
                f"augment: unknown value {augment!r}. Valid values: auto, {', '.join(AUGMENTS)}."
            )
        return augment, None
    probe = probe_symmetries(data.train, data.val, data.num_classes, config)
    return probe.augment, probe
