"""pipelines.data_layouts through load_dataset: image folders and npz files, and every bad-data message."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data import load_dataset
from pipelines.data_layouts import stratified_holdout
from pipelines.errors import ConfigError, DataError
from tests.helpers import synthetic_images

CLASSES = ("benign", "malignant", "normal")
SIZES = (("train", 60), ("val", 12), ("test", 12))


def _write_folder(
    root: Path,
    counts: dict[str, int],
    mode: str = "L",
    size: tuple[int, int] = (20, 20),
    classes: tuple[str, ...] = CLASSES,
) -> Path:
    """root/<split>/<class>/NN.png images whose brightness encodes the class (learnable, distinct)."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                level = 40 + 80 * index + rng.integers(0, 20)
                pixels = np.full((size[1], size[0], 3 if mode == "RGB" else 1), level, dtype=np.uint8)
                image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
                image.save(folder / f"{number:02d}.png")
    return root


def _write_npz(path: Path, sizes=(60, 12, 12), num_classes: int = 3, channels: int = 1, **overrides) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        labels = np.arange(count) % num_classes
        images = synthetic_images(labels, channels, num_classes, rng)
        arrays[f"{split}_images"] = images[..., 0] if channels == 1 else images
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


# --- image folders -----------------------------------------------------------------------------------------


def test_grey_folder_with_val_loads_resized_with_class_names_from_folders(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "scans", {"train": 6, "val": 2, "test": 3}, size=(20, 30))
    data = load_dataset("folder", root, size=16)
    assert data.name == "scans" and data.class_names == list(CLASSES)
    assert data.channels == 1 and data.image_size == 16 and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 9)
    assert data.train.images.shape == (18, 1, 16, 16)
    assert torch.equal(torch.bincount(data.test.labels), torch.tensor([3, 3, 3]))
    assert data.split_seed is None and len(data.fingerprint) == 64
    # brightness encodes the class: the class means are ordered like the folders
    means = [float(data.train.images[data.train.labels == label].mean()) for label in range(3)]
    assert means == sorted(means)


def test_rgb_folder_without_val_cuts_a_stratified_seeded_split(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", {"train": 10, "test": 2}, mode="RGB")
    data = load_dataset("folder", root, size=12, split_seed=3)
    assert data.channels == 3 and data.train.images.shape[1:] == (3, 12, 12)
    assert data.split_seed == 3
    assert torch.equal(torch.bincount(data.val.labels), torch.tensor([1, 1, 1]))  # 10% of 10 per class
    assert torch.equal(torch.bincount(data.train.labels), torch.tensor([9, 9, 9]))
    again = load_dataset("folder", root, size=12, split_seed=3)
    other = load_dataset("folder", root, size=12, split_seed=4)
    assert again.fingerprint == data.fingerprint
    assert other.fingerprint != data.fingerprint  # another validation split is other data


def test_grey_and_colour_images_mixed_load_as_colour(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "mixed", {"train": 3, "test": 1})
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8), "RGB").save(root / "train" / "normal" / "rgb.png")
    data = load_dataset("folder", root, size=8)
    assert data.channels == 3


def test_fingerprint_follows_the_pixels_not_the_file_name(tmp_path: Path) -> None:
    small = load_dataset("folder", _write_folder(tmp_path / "a", {"train": 3, "val": 1, "test": 1}), size=8)
    large = load_dataset("folder", tmp_path / "a", size=16)
    assert small.fingerprint != large.fingerprint  # same files, other image size
    copy = load_dataset("folder", _write_folder(tmp_path / "b", {"train": 3, "val": 1, "test": 1}), size=8)
    assert copy.fingerprint == small.fingerprint


@pytest.mark.parametrize(
    ("damage", "named", "fix"),
    [
        ("empty_class", "train/normal", "Add some"),
        ("missing_in_test", "test/normal", "Add some"),
        ("missing_in_val", "val/normal", "remove val/"),
        ("extra_in_test", "test", "not in train"),
        ("unreadable", "train/benign/00.png", "Replace it"),
        ("one_class", "train", "at least 2"),
        ("no_test", "has no train/ and test/", "Point data.root"),
        ("stray_file", "train", "Move each image"),
    ],
)
def test_bad_folders_name_the_place_and_the_fix(tmp_path: Path, damage: str, named: str, fix: str) -> None:
    root = _write_folder(tmp_path / "data", {"train": 3, "val": 1, "test": 1})
    if damage == "empty_class":
        for file in (root / "train" / "normal").iterdir():
            file.unlink()
    elif damage in ("missing_in_test", "missing_in_val"):
        folder = root / ("test" if damage == "missing_in_test" else "val") / "normal"
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()
    elif damage == "extra_in_test":
        (root / "test" / "other").mkdir()
    elif damage == "unreadable":
        (root / "train" / "benign" / "00.png").write_bytes(b"not a png")
    elif damage == "one_class":
        root = _write_folder(tmp_path / "single", {"train": 3, "test": 1}, classes=("only",))
    elif damage == "no_test":
        for file in (root / "test").rglob("*.png"):
            file.unlink()
        for folder in (root / "test").iterdir():
            folder.rmdir()
        (root / "test").rmdir()
    elif damage == "stray_file":
        (root / "train" / "loose.png").write_bytes(b"")
    with pytest.raises(DataError) as caught:
        load_dataset("folder", root, size=8)
    message = str(caught.value)
    assert named in message and fix in message, message


def test_too_few_images_to_cut_a_validation_split(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", {"train": 1, "test": 1})
    with pytest.raises(DataError, match="at least 2 per class.*provide a validation split"):
        load_dataset("folder", root, size=8)


def test_folder_and_npz_need_their_location() -> None:
    with pytest.raises(ConfigError, match="data.root"):
        load_dataset("folder")
    with pytest.raises(ConfigError, match="data.path"):
        load_dataset("npz")


# --- npz files ---------------------------------------------------------------------------------------------


def test_npz_loads_with_inferred_or_stored_class_names(tmp_path: Path) -> None:
    data = load_dataset("npz", path=_write_npz(tmp_path / "digits.npz"))
    assert data.name == "digits" and data.class_names == ["0", "1", "2"]
    assert (len(data.train), len(data.val), len(data.test)) == (60, 12, 12)
    assert data.channels == 1 and data.image_size == 28 and data.split_seed is None
    named = load_dataset(
        "npz", path=_write_npz(tmp_path / "named.npz", class_names=np.array(["a", "b", "c"])), size=28
    )
    assert named.class_names == ["a", "b", "c"]
    assert named.fingerprint != data.fingerprint  # class names are part of the content


def test_npz_without_val_is_split_and_other_sizes_are_resized(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "noval.npz", channels=3, val_images=None, val_labels=None)
    data = load_dataset("npz", path=path, size=16, split_seed=1)
    assert data.split_seed == 1 and len(data.val) == 6 and len(data.train) == 54
    assert data.train.images.shape[1:] == (3, 16, 16) and data.image_size == 16


def _images_of_two_sizes(count: int) -> np.ndarray:
    """What numpy makes of a list of images of different sizes: an array of Python objects."""
    images = np.empty(count, dtype=object)
    for index in range(count):
        images[index] = np.zeros((28 + index % 2, 28), dtype=np.uint8)
    return images


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"test_labels": None}, "no 'test_labels' array"),
        ({"val_images": None}, "no 'val_images' array"),
        ({"val_images": np.zeros((12, 32, 32), dtype=np.uint8)}, "mixed image sizes"),
        (
            {"val_images": _images_of_two_sizes(12)},
            "val_images holds Python objects (images of mixed sizes?)",
        ),
        ({f"{split}_labels": np.zeros(count, dtype=np.uint8) for split, count in SIZES}, "only one class"),
        ({"test_labels": np.full((12, 1), -1)}, "outside the 3 classes"),
        ({"class_names": np.array(["a", "b"])}, "outside the 2 classes"),
        ({"train_labels": np.tile([0, 2], 30)}, "'1' have no training images"),
        ({"train_images": np.zeros((60, 28, 28), dtype=np.float32) + 0.5}, "store uint8"),
        ({"train_images": np.zeros((60, 28, 20), dtype=np.uint8)}, "square"),
        ({"train_labels": np.zeros((60, 3), dtype=np.uint8)}, "multi-label"),
    ],
)
def test_bad_npz_names_the_file_and_the_fix(tmp_path: Path, overrides: dict, expected: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(DataError) as caught:
        load_dataset("npz", path=path)
    assert str(path) in str(caught.value) and expected in str(caught.value), str(caught.value)


def test_truncated_npz_is_a_data_error_not_a_traceback(tmp_path: Path) -> None:
    whole = _write_npz(tmp_path / "whole.npz").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30, 100):
        path = tmp_path / f"cut{cut}.npz"
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError, match=f"unreadable: {path}.*copy or export it again"):
            load_dataset("npz", path=path)
    # a zip member whose compressed bytes are damaged
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **dict(np.load(tmp_path / "whole.npz")))
    raw = bytearray(compressed.read_bytes())
    with zipfile.ZipFile(compressed) as archive:
        start = archive.infolist()[0].header_offset + 80
    raw[start : start + 40] = bytes(40)
    compressed.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="unreadable"):
        load_dataset("npz", path=compressed)


def test_missing_npz_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a file.*data.path"):
        load_dataset("npz", path=tmp_path / "absent.npz")


def test_stratified_holdout_takes_a_share_of_every_class() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 2, 50])
    kept, held = stratified_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[held]).tolist() == [1, 2, 1, 5]
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(labels)))
    assert np.array_equal(held, stratified_holdout(labels, 0.1, seed=0)[1])
