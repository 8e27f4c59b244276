"""Datasets as in-memory tensors: any 2-D MedMNIST dataset (through the `medmnist` package) and CIFAR-10
(through torchvision's loader).

Splits are the published ones. The search scores on ``val``; ``test`` is read only to report an exported
model. CIFAR-10 has no published validation split: the last 5,000 training images (a fixed slice) are
held out as ``val``.

Example::

    data = load_dataset("bloodmnist", root="../shared/data")
    for images, labels in data.train.batches(128, shuffle=True, augment="flips", seed=0):
        ...
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import ConfigError, DataError, unknown_name

__all__ = [
    "AUGMENTS",
    "AUGMENT_VIEWS",
    "Split",
    "Dataset",
    "load_dataset",
    "dataset_names",
    "default_data_root",
    "md5sum",
    "symmetry_views",
]

# Training augmentations: every one is a random crop (reflect-pad 2) plus a group of symmetries.
# "flips": horizontal and vertical flips (4 views). "d4": flips and transposes, all 8 rotations and
# reflections of the square (for data without an orientation, such as cells under a microscope).
AUGMENTS = ("none", "flips", "d4")
AUGMENT_VIEWS = {"none": 1, "flips": 4, "d4": 8}  # how many symmetric views each augmentation trains on

CIFAR10_VAL_SIZE = 5000
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _medmnist_info() -> dict:
    from medmnist import INFO

    # Only 2-D datasets: the 3-D ones (…mnist3d) need a different model family.
    return {name: info for name, info in INFO.items() if not name.endswith("3d")}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted([*_medmnist_info(), "cifar10"])


def default_data_root() -> Path:
    """``$HYCOMP_DATA_ROOT`` if set, else medmnist's own default root (``~/.medmnist``)."""
    env = os.environ.get("HYCOMP_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    from medmnist.info import DEFAULT_ROOT

    return Path(DEFAULT_ROOT)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Split:
    """One split: images as float tensors (N, C, H, W) normalized with the train split's statistics."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None  # (N, classes) precomputed distillation targets, if any

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, fraction: float, seed: int = 0) -> Split:
        """A class-stratified random subset (used for cheap multi-fidelity trials)."""
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"subset: fraction {fraction} is out of range; use a value in (0, 1].")
        if fraction >= 1.0:
            return self
        generator = np.random.default_rng(seed)
        labels = self.labels.numpy()
        keep = []
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            count = max(1, int(round(len(members) * fraction)))
            keep.append(generator.choice(members, size=count, replace=False))
        index = torch.from_numpy(np.sort(np.concatenate(keep)))
        return self._take(index)

    def _take(self, index: torch.Tensor) -> Split:
        logits = None if self.teacher_logits is None else self.teacher_logits[index]
        return Split(self.images[index], self.labels[index], logits)

    def with_teacher_logits(self, logits: torch.Tensor) -> Split:
        """This split with per-sample distillation targets attached (see ``batches(with_targets=True)``)."""
        if logits.shape[0] != len(self):
            raise ConfigError(f"teacher logits: {logits.shape[0]} rows for a split of {len(self)} samples.")
        return Split(self.images, self.labels, logits)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        with_targets: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (images, labels) mini-batches, or (images, labels, teacher_logits) with ``with_targets``.

        ``augment`` is one of :data:`AUGMENTS`: a random crop (pad 2) plus random symmetries."""
        if augment not in AUGMENTS:
            raise unknown_name("augment", augment, AUGMENTS)
        if with_targets and self.teacher_logits is None:
            raise ConfigError("batches(with_targets=True): this split has no teacher logits attached.")
        count = len(self)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            images = self.images[index]
            if augment != "none":
                images = _augment(images, generator, transpose=augment == "d4")
            if with_targets:
                yield images, self.labels[index], self.teacher_logits[index]
            else:
                yield images, self.labels[index]


def symmetry_views(images: torch.Tensor, augment: str) -> list[torch.Tensor]:
    """Every symmetry of ``augment``'s group applied to ``images``: 1 view (none), 4 (flips) or 8 (d4)."""
    if augment not in AUGMENTS:
        raise unknown_name("augment", augment, AUGMENTS)
    views = [images]
    if augment == "none":
        return views
    views += [images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    if augment == "d4":
        views += [view.transpose(-1, -2) for view in views]
    return views


def _augment(
    images: torch.Tensor, generator: torch.Generator, pad: int = 2, transpose: bool = False
) -> torch.Tensor:
    """Per-sample random crop (reflect-pad by ``pad``), horizontal and vertical flips and, with
    ``transpose``, transposes (square images), vectorized."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]
    batch_index = torch.arange(batch)[:, None, None, None]
    channel_index = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch_index, channel_index, rows, cols]
    flip_h = torch.rand(batch, generator=generator) < 0.5
    flip_v = torch.rand(batch, generator=generator) < 0.5
    out[flip_h] = out[flip_h].flip(-1)
    out[flip_v] = out[flip_v].flip(-2)
    if transpose and height == width:
        swap = torch.rand(batch, generator=generator) < 0.5
        out[swap] = out[swap].transpose(-1, -2)
    return out


@dataclass
class Dataset:
    """A dataset's three splits plus what a model needs to know about it."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int
    class_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def normalize(self, images_uint8: np.ndarray) -> torch.Tensor:
        """Turn raw (N, H, W[, C]) uint8 images into normalized (N, C, H, W) float tensors."""
        return _to_tensor(images_uint8, self.channels, self.mean, self.std, self.image_size)


def _to_tensor(
    images: np.ndarray, channels: int, mean: list[float], std: list[float], image_size: int
) -> torch.Tensor:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (image_size, image_size, channels):
        raise DataError(
            f"images: expected shape (N, {image_size}, {image_size}, {channels}) or "
            f"(N, {image_size}, {image_size}) for grey images, got {tuple(images.shape)}. "
            "Resize the images to the dataset's size and channels."
        )
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (tensor - mean_t) / std_t


def _channel_stats(train_images: np.ndarray, channels: int) -> tuple[list[float], list[float]]:
    pixels = train_images.reshape(-1, channels).astype(np.float64) / 255.0
    std = pixels.std(axis=0)
    std[std < 1e-6] = 1.0
    return pixels.mean(axis=0).tolist(), std.tolist()


def _make_dataset(
    name: str,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    channels: int,
    class_names: list[str],
    source: str,
) -> Dataset:
    train_images = arrays["train"][0]
    if train_images.ndim == 3:
        train_images = train_images[..., None]
    if train_images.ndim != 4 or train_images.shape[1] != train_images.shape[2]:
        raise DataError(
            f"{source}: train images have shape {tuple(arrays['train'][0].shape)}, expected "
            "(N, H, W) or (N, H, W, C) with square images. The file is not a MedMNIST 2-D dataset."
        )
    if train_images.shape[3] != channels:
        raise DataError(
            f"{source}: train images have {train_images.shape[3]} channel(s), but {name} has {channels} "
            f"({'grey' if channels == 1 else 'colour'} images). "
            "The file belongs to another dataset; replace it."
        )
    image_size = int(train_images.shape[1])
    mean, std = _channel_stats(train_images, channels)
    splits = {}
    for split, (images, labels) in arrays.items():
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        if len(labels) != len(images):
            raise DataError(f"{source}: {split} has {len(images)} images but {len(labels)} labels.")
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(
                f"{source}: {split} labels span {labels.min()}..{labels.max()}, outside the "
                f"{len(class_names)} classes of {name}. The file belongs to another dataset."
            )
        splits[split] = Split(
            _to_tensor(np.asarray(images), channels, mean, std, image_size), torch.from_numpy(labels)
        )
    return Dataset(
        name=name,
        num_classes=len(class_names),
        channels=channels,
        image_size=image_size,
        class_names=class_names,
        mean=mean,
        std=std,
        source=source,
        **splits,
    )


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    size: int = 28,
    download: bool = False,
    verify_md5: bool = True,
) -> Dataset:
    """Load a dataset by name into memory.

    ``name`` is a MedMNIST 2-D flag (``bloodmnist``, ``pathmnist``, …) or ``cifar10``. ``root`` defaults
    to :func:`default_data_root`. A MedMNIST file is checked against the md5 that medmnist's INFO records
    (``verify_md5=False`` skips this, e.g. for test fixtures).
    """
    key = name.lower()
    root_path = Path(root).expanduser() if root is not None else default_data_root()
    if key == "cifar10":
        return _load_cifar10(root_path, download)
    infos = _medmnist_info()
    if key not in infos:
        raise unknown_name("dataset", name, dataset_names())
    info = infos[key]
    if info.get("task") not in ("multi-class", "binary-class", "ordinal-regression"):
        raise DataError(
            f"dataset: {name!r} is a {info.get('task')} task; hycomp searches single-label "
            "classifiers. Pick a multi-class MedMNIST dataset such as bloodmnist or pathmnist."
        )
    suffix = "" if size == 28 else f"_{size}"
    filename = f"{key}{suffix}.npz"
    path = root_path / filename
    if not path.exists() and download:
        _download_medmnist(info, key, size, root_path)
    if not path.exists():
        raise DataError(
            f"data file not found: {path}. Put {filename} (from MedMNIST: "
            f"{info.get('url' + suffix, info.get('url'))}) in that folder, or point --data-root / "
            "HYCOMP_DATA_ROOT at the folder that holds it, or pass --download on a machine with network."
        )
    expected_md5 = info.get("MD5" + suffix)
    if verify_md5 and expected_md5:
        actual = md5sum(path)
        if actual != expected_md5:
            raise DataError(
                f"data file corrupt: {path} has md5 {actual}, medmnist expects {expected_md5}. "
                "Replace the file with an intact copy (or re-download it)."
            )
    try:
        npz = np.load(path, allow_pickle=False)
        arrays = {
            split: (npz[f"{split}_images"], npz[f"{split}_labels"]) for split in ("train", "val", "test")
        }
    except (KeyError, ValueError, OSError) as error:
        raise DataError(
            f"data file unreadable: {path} ({error}). Expected a MedMNIST npz with train/val/test "
            "_images and _labels arrays; replace the file."
        ) from error
    class_names = [info["label"][str(index)] for index in range(len(info["label"]))]
    return _make_dataset(key, arrays, int(info["n_channels"]), class_names, str(path))


def _download_medmnist(info: dict, key: str, size: int, root: Path) -> None:
    import medmnist

    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, info["python_class"])
    try:
        dataset_class(split="train", root=str(root), download=True, size=size)
    except Exception as error:  # medmnist raises bare RuntimeErrors for network failures
        raise DataError(f"could not download {key} into {root}: {error}") from error


def _load_cifar10(root: Path, download: bool) -> Dataset:
    from torchvision.datasets import CIFAR10

    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except RuntimeError as error:
        raise DataError(
            f"CIFAR-10 not found or corrupt under {root} ({error}). Put the extracted "
            "cifar-10-batches-py/ folder there (torchvision's layout), point --data-root at its parent, "
            "or pass --download on a machine with network."
        ) from error
    train_images, train_labels = np.asarray(train.data), np.asarray(train.targets)
    arrays = {
        "train": (train_images[:-CIFAR10_VAL_SIZE], train_labels[:-CIFAR10_VAL_SIZE]),
        "val": (train_images[-CIFAR10_VAL_SIZE:], train_labels[-CIFAR10_VAL_SIZE:]),
        "test": (np.asarray(test.data), np.asarray(test.targets)),
    }
    return _make_dataset("cifar10", arrays, 3, list(_CIFAR10_CLASSES), str(root / "cifar-10-batches-py"))
