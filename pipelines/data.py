"""Datasets as in-memory tensors: any 2-D MedMNIST dataset (through the `medmnist` package), CIFAR-10
(through torchvision's loader), and a user's own data: an image folder or an npz file in MedMNIST's
layout (:mod:`pipelines.data_layouts` reads and checks those).

Splits are the published ones. The search scores on ``val``; ``test`` is read only to report an exported
model. CIFAR-10 has no published validation split: the last 5,000 training images (a fixed slice) are
held out as ``val``; user data without one gets a stratified split cut from train with a recorded seed.
A :class:`Dataset` carries a fingerprint of its pixels and labels, for cache keys.

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

from pipelines import symmetry
from pipelines.data_layouts import VAL_FRACTION, RawSplits, read_image_folder, read_npz, resize_splits
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
    "MEDMNIST_SIZES",
    "USER_LAYOUTS",
]

# Training augmentations: "none" trains on the images as they are; every other one is a random crop
# (reflect-pad 2) plus a group of symmetries. "crop": no symmetry. "hflip": horizontal flips (2 views, for
# data whose up and down differ, such as photographs). "flips": horizontal and vertical flips (4 views).
# "d4": flips and transposes, all 8 rotations and reflections of the square (for data without an
# orientation, such as cells under a microscope). Each group is the first views of symmetry_views' d4
# order, so a group's views are also its test-time and ensemble views.
AUGMENTS = ("none", "crop", "hflip", "flips", "d4")
AUGMENT_VIEWS = {"none": 1, "crop": 1, "hflip": 2, "flips": 4, "d4": 8}  # symmetric views of each group

MEDMNIST_SIZES = (28, 64, 128, 224)  # the image sizes medmnist publishes (files <flag>_<size>.npz above 28)
USER_LAYOUTS = ("folder", "npz")  # load_dataset names for a user's own data (pipelines.data_layouts)

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
                images = _augment(images, generator, views=AUGMENT_VIEWS[augment])
            if with_targets:
                yield images, self.labels[index], self.teacher_logits[index]
            else:
                yield images, self.labels[index]


def symmetry_views(images: torch.Tensor, augment: str) -> list[torch.Tensor]:
    """Every symmetry of ``augment``'s group applied to ``images``: 1 view (none, crop), 2 (hflip), 4 (flips)
    or 8 (d4)."""
    if augment == "auto":
        raise ConfigError(
            "augment: 'auto' has no views of its own; resolve it first with "
            "pipelines.symmetry_probe.resolve_augment (the probe picks crop, hflip, flips or d4)."
        )
    if augment not in AUGMENTS:
        raise unknown_name("augment", augment, AUGMENTS)
    return symmetry.views(images, AUGMENT_VIEWS[augment])


def _augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2, views: int = 4) -> torch.Tensor:
    """Per-sample random crop (reflect-pad by ``pad``) plus the symmetries of the group of ``views``
    (:data:`AUGMENT_VIEWS`): horizontal flips from 2, vertical flips from 4, transposes at 8 (square
    images), vectorized. The random draws are the same for every group, so a seed crops alike."""
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
    if views >= 2:
        out[flip_h] = out[flip_h].flip(-1)
    if views >= 4:
        out[flip_v] = out[flip_v].flip(-2)
    if views >= 8 and height == width:
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
    fingerprint: str = ""  # sha256 of the pixels, labels and class names of every split (for cache keys)
    split_seed: int | None = None  # seed of a validation split cut from train; None: the data had one

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


def _fingerprint(raw: RawSplits) -> str:
    """sha256 over every split's pixels and labels (with their shapes) and the class names."""
    digest = hashlib.sha256()
    digest.update("\n".join(raw.class_names).encode())
    for split in ("train", "val", "test"):
        images, labels = raw.images[split], raw.labels[split]
        digest.update(f"{split}:{images.shape}:{labels.shape}".encode())
        digest.update(np.ascontiguousarray(images).data)
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).data)
    return digest.hexdigest()


def _make_dataset(name: str, raw: RawSplits) -> Dataset:
    """Normalize checked arrays with the train split's per-channel statistics."""
    mean, std = _channel_stats(raw.images["train"], raw.channels)
    splits = {
        split: Split(
            _to_tensor(raw.images[split], raw.channels, mean, std, raw.image_size),
            torch.from_numpy(raw.labels[split]),
        )
        for split in ("train", "val", "test")
    }
    return Dataset(
        name=name,
        num_classes=len(raw.class_names),
        channels=raw.channels,
        image_size=raw.image_size,
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
        source=raw.source,
        fingerprint=_fingerprint(raw),
        split_seed=raw.split_seed,
        **splits,
    )


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    size: int = 28,
    download: bool = False,
    verify_md5: bool = True,
    *,
    path: str | os.PathLike | None = None,
    val_fraction: float = VAL_FRACTION,
    split_seed: int = 0,
) -> Dataset:
    """Load a dataset by name into memory.

    ``name`` is a MedMNIST 2-D flag (``bloodmnist``, ``pathmnist``, …), ``cifar10``, or one of the user
    layouts (:data:`USER_LAYOUTS`):

    - ``folder``: ``root`` is a folder of ``train/<class>/*``, ``test/<class>/*`` and optionally
      ``val/<class>/*`` images, resized to ``size``;
    - ``npz``: ``path`` is an npz file in MedMNIST's layout (resized to ``size`` if its images differ).

    Without a validation split, ``val_fraction`` of each class is cut from train with ``split_seed``
    (recorded in ``Dataset.split_seed``). ``root`` of a MedMNIST flag or CIFAR-10 defaults to
    :func:`default_data_root`; ``size`` is one of :data:`MEDMNIST_SIZES` there. A MedMNIST file is checked
    against the md5 that medmnist's INFO records (``verify_md5=False`` skips this, e.g. for test fixtures).

    Example: ``load_dataset("npz", path="../shared/data/mnist.npz")``.
    """
    key = name.lower()
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {val_fraction} is out of range; use a value in (0, 1).")
    if key in USER_LAYOUTS and size < 8:
        raise ConfigError(f"data.size: {size} is too small; use 8 or more pixels.")
    if key == "folder":
        if root is None:
            raise ConfigError(
                "data.root: required for dataset 'folder'; set it to the folder that holds train/."
            )
        raw = read_image_folder(root, size, val_fraction, split_seed)
        return _make_dataset(Path(root).expanduser().resolve().name, raw)
    if key == "npz":
        if path is None:
            raise ConfigError("data.path: required for dataset 'npz'; set it to the .npz file.")
        raw = read_npz(path, val_fraction=val_fraction, split_seed=split_seed)
        if raw.image_size != size:
            raw = resize_splits(raw, size)
        return _make_dataset(Path(path).stem, raw)
    root_path = Path(root).expanduser() if root is not None else default_data_root()
    if key == "cifar10":
        return _load_cifar10(root_path, download)
    return _load_medmnist(key, name, root_path, size, download, verify_md5)


def _load_medmnist(key: str, name: str, root: Path, size: int, download: bool, verify_md5: bool) -> Dataset:
    infos = _medmnist_info()
    if key not in infos:
        raise unknown_name("dataset", name, dataset_names())
    info = infos[key]
    if info.get("task") not in ("multi-class", "binary-class", "ordinal-regression"):
        raise DataError(
            f"dataset: {name!r} is a {info.get('task')} task; hycomp searches single-label "
            "classifiers. Pick a multi-class MedMNIST dataset such as bloodmnist or pathmnist."
        )
    if size not in MEDMNIST_SIZES:
        raise ConfigError(
            f"data.size: {size} is not a size MedMNIST publishes for {key}. Valid sizes: "
            f"{', '.join(map(str, MEDMNIST_SIZES))}."
        )
    suffix = "" if size == 28 else f"_{size}"
    filename = f"{key}{suffix}.npz"
    path = root / filename
    if not path.exists() and download:
        _download_medmnist(info, key, size, root)
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
    class_names = [info["label"][str(index)] for index in range(len(info["label"]))]
    raw = read_npz(path, class_names=class_names)
    channels = int(info["n_channels"])
    if raw.channels != channels:
        raise DataError(
            f"{path}: train images have {raw.channels} channel(s), but {key} has {channels} "
            f"({'grey' if channels == 1 else 'colour'} images). "
            "The file belongs to another dataset; replace it."
        )
    if raw.image_size != size:
        raise DataError(
            f"{path}: images are {raw.image_size}x{raw.image_size}, but {filename} should hold {size}x{size} "
            f"ones. The file belongs to another size; replace it with MedMNIST's {filename}."
        )
    return _make_dataset(key, raw)


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
    train_labels = train_labels.astype(np.int64)
    raw = RawSplits(
        images={
            "train": train_images[:-CIFAR10_VAL_SIZE],
            "val": train_images[-CIFAR10_VAL_SIZE:],
            "test": np.asarray(test.data),
        },
        labels={
            "train": train_labels[:-CIFAR10_VAL_SIZE],
            "val": train_labels[-CIFAR10_VAL_SIZE:],
            "test": np.asarray(test.targets, dtype=np.int64),
        },
        class_names=list(_CIFAR10_CLASSES),
        source=str(root / "cifar-10-batches-py"),
    )
    return _make_dataset("cifar10", raw)
