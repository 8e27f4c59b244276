"""Read a user's data into checked uint8 arrays: an image folder or an npz file in MedMNIST's layout.

Layouts (``pipelines.data.load_dataset`` turns the arrays into normalized tensors):

- ``folder``: ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*`` (optional), ``ROOT/test/<class>/*``; any
  image Pillow reads, grey or colour, any size (resized to a square of ``size``). Class names are the
  folder names, sorted.
- ``npz``: one file with ``train_images``/``train_labels``, ``val_…`` (optional) and ``test_…`` arrays,
  images (N, H, W) or (N, H, W, C) uint8, labels (N,) or (N, 1); an optional ``class_names`` array.

Without a validation split, a stratified one is cut from train with a recorded seed. Every problem a
user can fix is a :class:`DataError` naming the file or folder and the fix.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import DataError

__all__ = [
    "RawSplits",
    "read_image_folder",
    "read_npz",
    "resize_splits",
    "stratified_holdout",
    "VAL_FRACTION",
    "SPLITS",
]

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1  # of each class's training images, held out when the data has no validation split
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class RawSplits:
    """Checked arrays: per split, uint8 images (N, H, W, C) and int64 labels (N,) in ``range(classes)``."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    source: str
    split_seed: int | None = None  # the seed of the validation split cut from train; None: the data had one

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[3])

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) sorted indices: ``fraction`` of each class (at least one sample) is held out.

    A class with a single sample cannot be split: the caller checks for that first."""
    generator = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = min(len(members) - 1, max(1, int(round(len(members) * fraction))))
        held.append(generator.choice(members, size=count, replace=False))
    held_index = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_index = np.setdiff1d(np.arange(len(labels)), held_index)
    return kept_index, held_index


def _cut_validation(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], where: str, fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    counts = np.bincount(labels, minlength=len(class_names))
    for index, count in enumerate(counts):
        if count < 2:
            raise DataError(
                f"{where}: class {class_names[index]!r} has {count} training image(s); cutting a validation "
                "split from train needs at least 2 per class. Add images of that class, or provide a "
                "validation split."
            )
    kept, held = stratified_holdout(labels, fraction, seed)
    return (images[kept], labels[kept]), (images[held], labels[held])


def _check_labels(raw_labels: np.ndarray, key: str, source: str, count: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(raw_labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{source}: {key} has shape {tuple(raw_labels.shape)}; expected (N,) or (N, 1) class indices "
            "(one label per image; multi-label data is not supported)."
        )
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: {key} has dtype {labels.dtype}; store integer class indices 0..K-1.")
    labels = labels.astype(np.int64)
    if len(labels) != count:
        raise DataError(
            f"{source}: {key.replace('_labels', '')} has {count} images but {len(labels)} labels. "
            "Re-export the file with one label per image."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: {key} span {labels.min()}..{labels.max()}, outside the {num_classes} classes "
            f"(0..{num_classes - 1}). The file belongs to another dataset, or its class_names are incomplete."
        )
    return labels


def _largest_label(labels: np.ndarray) -> int:
    """The largest label, 0 for none or for labels that are not numbers (their check reports them)."""
    labels = np.asarray(labels)
    if labels.size == 0 or labels.dtype.kind not in "iuf" or not np.all(np.isfinite(labels)):
        return 0
    return int(labels.max())


def _check_images(raw: np.ndarray, key: str, source: str) -> np.ndarray:
    images = np.asarray(raw)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DataError(
            f"{source}: {key} has shape {tuple(raw.shape)}; expected (N, H, W) grey or (N, H, W, 1|3) images."
        )
    if images.shape[1] != images.shape[2]:
        raise DataError(
            f"{source}: {key} are {images.shape[1]}x{images.shape[2]}; expected square images "
            "(N, H, W) or (N, H, W, C). Crop or resize them to squares before exporting."
        )
    if images.dtype != np.uint8:
        if images.dtype.kind not in "iu" or (images.size and (images.min() < 0 or images.max() > 255)):
            raise DataError(
                f"{source}: {key} has dtype {images.dtype}; store uint8 pixels 0..255 "
                "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])."
            )
        images = images.astype(np.uint8)
    return images


def _check_splits(raw: RawSplits) -> RawSplits:
    """Checks across splits: one image size and channel count, at least two classes, each in train."""
    train = raw.images["train"]
    for split in SPLITS[1:]:
        if raw.images[split].shape[1:] != train.shape[1:]:
            height, width, channels = train.shape[1:]
            raise DataError(
                f"{raw.source}: {split} images have shape {tuple(raw.images[split].shape)}, expected "
                f"(N, {height}, {width}, {channels}) like train (mixed image sizes or channels). "
                "Export every split at one size and channel count."
            )
    if len(raw.class_names) < 2:
        raise DataError(
            f"{raw.source}: only one class ({raw.class_names[0]!r}); a classifier needs at least 2. "
            "Add the other classes' images."
        )
    counts = np.bincount(raw.labels["train"], minlength=len(raw.class_names))
    missing = [raw.class_names[index] for index in np.flatnonzero(counts == 0)]
    if missing:
        raise DataError(
            f"{raw.source}: class(es) {', '.join(map(repr, missing))} have no training images. "
            "Add training images of those classes, or remove them from the class list."
        )
    return raw


def read_npz(
    path: str | os.PathLike,
    class_names: list[str] | None = None,
    val_fraction: float = VAL_FRACTION,
    split_seed: int = 0,
) -> RawSplits:
    """The arrays of an npz in MedMNIST's layout, checked. ``class_names`` (e.g. from medmnist's INFO)
    overrides the file's own ``class_names`` array; without either, classes are ``0..max label``."""
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise DataError(f"data.path: {path} is not a file. Point data.path at an npz in MedMNIST's layout.")
    key = None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {}
            for key in npz.files:
                arrays[key] = npz[key]
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise _unreadable(path, error) from error
        # An array of Python objects: what numpy makes of a list of images of different sizes.
        raise DataError(
            f"{source}: {key} holds Python objects (images of mixed sizes?), which hycomp does not unpickle. "
            "Resize every image to one square size and save one uint8 array (N, H, W[, C]) per key."
        ) from error
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        raise _unreadable(path, error) from error
    with_val = [key in arrays for key in ("val_images", "val_labels")]
    present = SPLITS if all(with_val) else ("train", "test")
    required = [
        f"{split}_{kind}"
        for split in SPLITS
        if split in present or any(with_val)
        for kind in ("images", "labels")
    ]
    for key in required:
        if key not in arrays:
            raise DataError(
                f"{source}: no {key!r} array (found: {', '.join(sorted(arrays)) or 'none'}). Add it; the "
                "layout is train/val/test _images and _labels (val may be left out entirely)."
            )
    if class_names is None and "class_names" in arrays:
        class_names = [str(name) for name in np.asarray(arrays["class_names"]).reshape(-1)]
    if class_names is None:
        top = max(_largest_label(arrays[f"{split}_labels"]) for split in present)
        class_names = [str(index) for index in range(top + 1)]
    images, labels = {}, {}
    for split in present:
        images[split] = _check_images(arrays[f"{split}_images"], f"{split}_images", source)
        labels[split] = _check_labels(
            arrays[f"{split}_labels"], f"{split}_labels", source, len(images[split]), len(class_names)
        )
    seed = None
    if not all(with_val):
        seed = split_seed
        (images["train"], labels["train"]), (images["val"], labels["val"]) = _cut_validation(
            images["train"], labels["train"], class_names, source, val_fraction, split_seed
        )
    return _check_splits(RawSplits(images, labels, list(class_names), source, seed))


def _unreadable(path: Path, error: Exception) -> DataError:
    return DataError(
        f"data file unreadable: {path} ({type(error).__name__}: {error}). It is truncated or not an npz; "
        "copy or export it again (train/val/test _images and _labels arrays, saved with np.savez)."
    )


def _class_folders(folder: Path) -> list[Path]:
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    strays = [entry.name for entry in entries if not entry.is_dir()]
    if strays:
        raise DataError(
            f"{folder}: holds files outside class folders ({', '.join(strays[:3])}). Move each image into "
            f"{folder}/<class name>/."
        )
    return entries


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """(uint8 (size, size) grey or (size, size, 3) colour pixels, whether the file is grey)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            grey = image.mode in _GREY_MODES
            if image.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            image = image.convert("L" if grey else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8), grey
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{path}: unreadable image ({error}). Replace it with a PNG/JPEG, or move it out of the "
            "dataset folder."
        ) from error


def read_image_folder(
    root: str | os.PathLike, size: int, val_fraction: float = VAL_FRACTION, split_seed: int = 0
) -> RawSplits:
    """The images of ``root/{train,val,test}/<class>/*`` resized to ``size`` x ``size``, checked."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(
            f"data.root: {root} has no train/ and test/ folders. Point data.root at a folder holding "
            "train/<class>/*, test/<class>/* and optionally val/<class>/* images."
        )
    class_names = [folder.name for folder in _class_folders(root / "train")]
    if len(class_names) < 2:
        raise DataError(
            f"{root / 'train'}: {len(class_names)} class folder(s) ({', '.join(class_names) or 'none'}); a "
            "classifier needs at least 2. Add one folder of images per class."
        )
    present = [split for split in SPLITS if (root / split).is_dir()]
    pixels: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    all_grey = True
    for split in present:
        folders = {folder.name: folder for folder in _class_folders(root / split)}
        extra = sorted(set(folders) - set(class_names))
        if extra:
            raise DataError(
                f"{root / split}: class folder(s) {', '.join(extra)} are not in train/. Add training "
                "images for them, or remove those folders."
            )
        split_pixels, split_labels = [], []
        for index, name in enumerate(class_names):
            folder = root / split / name
            files = (
                sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
                if name in folders
                else []
            )
            if not files:
                raise DataError(
                    f"{folder}: no images of class {name!r} in {split}/. Add some, "
                    + (
                        "or remove val/ to cut a validation split from train."
                        if split == "val"
                        else "or remove the class from every split."
                    )
                )
            for file in files:
                if file.is_dir():
                    raise DataError(f"{file}: a folder inside a class folder; move its images up one level.")
                image, grey = _read_image(file, size)
                all_grey &= grey
                split_pixels.append(image)
                split_labels.append(index)
        pixels[split] = split_pixels
        labels[split] = np.asarray(split_labels, dtype=np.int64)
    images = {split: _stack(pixels[split], all_grey) for split in present}
    seed = None
    if "val" not in present:
        seed = split_seed
        (images["train"], labels["train"]), (images["val"], labels["val"]) = _cut_validation(
            images["train"], labels["train"], class_names, str(root / "train"), val_fraction, split_seed
        )
    return _check_splits(RawSplits(images, labels, class_names, str(root), seed))


def _stack(images: list[np.ndarray], grey: bool) -> np.ndarray:
    """(N, size, size, 1) when every image of the dataset is grey, else (N, size, size, 3)."""
    if grey:
        return np.stack(images)[..., None]
    return np.stack(
        [np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image for image in images]
    )


def resize_splits(raw: RawSplits, size: int) -> RawSplits:
    """Every split resized to ``size`` x ``size`` (antialiased bilinear), still uint8."""
    images = {}
    for split, pixels in raw.images.items():
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
        tensor = torch.nn.functional.interpolate(
            tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        images[split] = tensor.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return RawSplits(images, raw.labels, raw.class_names, raw.source, raw.split_seed)
