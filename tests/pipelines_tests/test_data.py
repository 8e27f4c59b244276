"""pipelines.data: MedMNIST and CIFAR-10 loading, normalization, splits, subsets, batches, augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines.data as data_module
from pipelines.data import (
    Dataset,
    Split,
    dataset_names,
    default_data_root,
    load_dataset,
    md5sum,
    symmetry_views,
)
from pipelines.errors import ConfigError, DataError
from tests.helpers import write_synthetic_medmnist

REAL_BLOODMNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bloodmnist.npz"


def _write_npz(folder: Path, name: str = "bloodmnist", **overrides: np.ndarray) -> Path:
    """A valid synthetic file with some arrays replaced (or removed, when the override is None)."""
    source = write_synthetic_medmnist(folder / "source", name=name, sizes=(64, 16, 16))
    arrays = dict(np.load(source))
    for key, value in overrides.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


# --- MedMNIST --------------------------------------------------------------------------------------------


def test_synthetic_bloodmnist_shapes_and_metadata(tiny_data: Dataset) -> None:
    assert tiny_data.name == "bloodmnist"
    assert (len(tiny_data.train), len(tiny_data.val), len(tiny_data.test)) == (320, 96, 96)
    assert tiny_data.train.images.shape == (320, 3, 28, 28)
    assert tiny_data.train.images.dtype == torch.float32
    assert tiny_data.train.labels.dtype == torch.int64
    assert tiny_data.num_classes == 8 and tiny_data.channels == 3 and tiny_data.image_size == 28
    assert tiny_data.input_shape == (3, 28, 28)
    assert tiny_data.class_names[0] == "basophil" and len(tiny_data.class_names) == 8
    assert set(tiny_data.train.labels.tolist()) == set(range(8))
    assert tiny_data.source.endswith("bloodmnist.npz")


def test_train_split_is_normalized_per_channel(tiny_data: Dataset) -> None:
    images = tiny_data.train.images
    channel_mean = images.mean(dim=(0, 2, 3))
    channel_std = images.std(dim=(0, 2, 3))
    assert torch.allclose(channel_mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(channel_std, torch.ones(3), atol=1e-2)
    # Val/test reuse the train statistics (no leakage from the evaluation splits).
    assert len(tiny_data.mean) == 3 and len(tiny_data.std) == 3


def test_normalize_reproduces_the_loaded_splits(synthetic_root: Path, tiny_data: Dataset) -> None:
    raw = np.load(synthetic_root / "bloodmnist.npz")
    assert torch.allclose(tiny_data.normalize(raw["val_images"]), tiny_data.val.images, atol=1e-6)
    assert torch.equal(tiny_data.val.labels, torch.from_numpy(raw["val_labels"].reshape(-1).astype(np.int64)))


def test_grey_dataset_has_one_channel_and_info_class_count(tmp_path: Path) -> None:
    write_synthetic_medmnist(tmp_path, name="organamnist", channels=1, num_classes=11, sizes=(110, 22, 22))
    data = load_dataset("organamnist", tmp_path, verify_md5=False)
    assert data.channels == 1
    assert data.num_classes == 11  # from medmnist's INFO, not from the labels found in the file
    assert data.train.images.shape == (110, 1, 28, 28)
    assert data.input_shape == (1, 28, 28)
    assert abs(float(data.train.images.mean())) < 1e-4


def test_dataset_name_is_case_insensitive(synthetic_root: Path) -> None:
    data = load_dataset("BloodMNIST", synthetic_root, verify_md5=False)
    assert data.name == "bloodmnist" and len(data.train) == 320


def test_missing_file_names_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_dataset("bloodmnist", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "bloodmnist.npz") in message
    assert "HYCOMP_DATA_ROOT" in message and "--download" in message


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_dataset("imagenet", tmp_path)
    message = str(caught.value)
    assert "'imagenet'" in message
    for valid in ("bloodmnist", "pathmnist", "cifar10"):
        assert valid in message


def test_multi_label_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multi-label"):
        load_dataset("chestmnist", tmp_path)


def test_dataset_names_are_2d_medmnist_plus_cifar10() -> None:
    names = dataset_names()
    assert "cifar10" in names and "bloodmnist" in names and "organamnist" in names
    assert not any(name.endswith("3d") for name in names)
    assert names == sorted(names)


def test_default_data_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYCOMP_DATA_ROOT", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("HYCOMP_DATA_ROOT")
    assert default_data_root() != tmp_path


def test_corrupt_file_fails_md5_check(tmp_path: Path) -> None:
    (tmp_path / "bloodmnist.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError) as caught:
        load_dataset("bloodmnist", tmp_path, verify_md5=True)
    message = str(caught.value)
    assert "corrupt" in message and md5sum(tmp_path / "bloodmnist.npz") in message


def test_unreadable_file_without_md5_check(tmp_path: Path) -> None:
    (tmp_path / "bloodmnist.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="unreadable"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_synthetic_file_fails_the_real_md5(synthetic_root: Path) -> None:
    with pytest.raises(DataError, match="md5"):
        load_dataset("bloodmnist", synthetic_root)


def test_missing_array_is_a_data_error(tmp_path: Path) -> None:
    _write_npz(tmp_path, test_labels=None)
    with pytest.raises(DataError, match="test_labels"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_non_square_images_are_refused(tmp_path: Path) -> None:
    _write_npz(tmp_path, train_images=np.zeros((64, 28, 30, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="square"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_val_images_of_another_size_are_refused(tmp_path: Path) -> None:
    _write_npz(tmp_path, val_images=np.zeros((16, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match=r"\(N, 28, 28, 3\)"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_colour_images_for_a_grey_dataset_are_refused(tmp_path: Path) -> None:
    write_synthetic_medmnist(tmp_path, name="organamnist", channels=3, num_classes=11, sizes=(66, 22, 22))
    with pytest.raises(DataError, match="grey"):
        load_dataset("organamnist", tmp_path, verify_md5=False)


def test_grey_images_for_a_colour_dataset_are_refused(tmp_path: Path) -> None:
    # 64 * 28 * 28 pixels is not a multiple of 3: the reshape in _channel_stats fails first.
    write_synthetic_medmnist(tmp_path, name="bloodmnist", channels=1, sizes=(64, 16, 16))
    with pytest.raises(DataError):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_labels_outside_the_classes_are_refused(tmp_path: Path) -> None:
    _write_npz(tmp_path, val_labels=np.full((16, 1), 8, dtype=np.uint8))
    with pytest.raises(DataError, match="outside the 8 classes"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


def test_image_and_label_counts_must_match(tmp_path: Path) -> None:
    _write_npz(tmp_path, test_labels=np.zeros((15, 1), dtype=np.uint8))
    with pytest.raises(DataError, match="16 images but 15 labels"):
        load_dataset("bloodmnist", tmp_path, verify_md5=False)


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_BLOODMNIST.exists(), reason=f"real BloodMNIST not found at {REAL_BLOODMNIST}")
def test_real_bloodmnist_loads_with_md5_verified() -> None:
    data = load_dataset("bloodmnist", REAL_BLOODMNIST.parent, verify_md5=True)
    assert (len(data.train), len(data.val), len(data.test)) == (11959, 1712, 3421)
    assert data.num_classes == 8 and data.channels == 3 and data.image_size == 28
    assert data.train.images.shape == (11959, 3, 28, 28)
    assert set(data.train.labels.unique().tolist()) == set(range(8))


# --- Split: subset, batches, augmentation ----------------------------------------------------------------


def test_subset_is_stratified(tiny_data: Dataset) -> None:
    subset = tiny_data.train.subset(0.25, seed=3)
    full_counts = torch.bincount(tiny_data.train.labels, minlength=8)
    sub_counts = torch.bincount(subset.labels, minlength=8)
    assert torch.equal(sub_counts, torch.round(full_counts * 0.25).long())
    assert len(subset) == 80


def test_subset_is_deterministic_and_seeded(tiny_data: Dataset) -> None:
    first = tiny_data.train.subset(0.5, seed=1)
    again = tiny_data.train.subset(0.5, seed=1)
    other = tiny_data.train.subset(0.5, seed=2)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_subset_of_one_is_the_split_and_bad_fractions_fail(tiny_data: Dataset) -> None:
    assert tiny_data.train.subset(1.0) is tiny_data.train
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            tiny_data.train.subset(fraction)


def test_tiny_subset_keeps_every_class(tiny_data: Dataset) -> None:
    subset = tiny_data.train.subset(0.001)
    assert sorted(subset.labels.tolist()) == list(range(8))


def test_batches_cover_every_sample_once(tiny_data: Dataset) -> None:
    split = tiny_data.val
    seen_labels, sizes = [], []
    for images, labels in split.batches(40, shuffle=True, seed=5):
        assert images.shape[1:] == (3, 28, 28)
        seen_labels.append(labels)
        sizes.append(len(labels))
    assert sizes == [40, 40, 16]
    assert torch.equal(torch.cat(seen_labels).sort().values, split.labels.sort().values)


def test_unshuffled_batches_keep_order(tiny_data: Dataset) -> None:
    images = torch.cat([batch for batch, _ in tiny_data.val.batches(32)])
    assert torch.equal(images, tiny_data.val.images)


def test_shuffle_depends_on_seed_only(tiny_data: Dataset) -> None:
    def order(seed: int) -> torch.Tensor:
        return torch.cat([labels for _, labels in tiny_data.train.batches(64, shuffle=True, seed=seed)])

    assert torch.equal(order(7), order(7))
    assert not torch.equal(order(7), order(8))


def test_augment_keeps_shapes_and_labels_and_changes_pixels(tiny_data: Dataset) -> None:
    plain = list(tiny_data.val.batches(48, seed=0))
    augmented = list(tiny_data.val.batches(48, augment="flips", seed=0))
    for (images, labels), (aug_images, aug_labels) in zip(plain, augmented, strict=True):
        assert aug_images.shape == images.shape
        assert torch.equal(aug_labels, labels)
        changed = (aug_images - images).abs().flatten(1).amax(dim=1) > 0
        assert changed.float().mean() > 0.5  # most samples got a crop shift or a flip
    again = list(tiny_data.val.batches(48, augment="flips", seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(augmented, again, strict=True))


def test_augment_only_moves_pixels(tiny_data: Dataset) -> None:
    """Crops (reflect padding) and flips rearrange pixels: no new values appear in a channel."""
    images = tiny_data.val.images[:4]
    split = Split(images, tiny_data.val.labels[:4])
    ((augmented, _),) = split.batches(4, augment="flips", seed=1)
    for index in range(4):
        original_values = set(images[index, 0].flatten().tolist())
        assert set(augmented[index, 0].flatten().tolist()) <= original_values


def test_d4_augment_transposes_and_flips_keep_to_the_symmetry_group() -> None:
    """With no crop room (a 1-pixel pad would still shift), compare against the 8 exact views."""
    torch.manual_seed(0)
    images = torch.randn(64, 1, 6, 6)
    split = Split(images, torch.zeros(64, dtype=torch.long))
    ((augmented, _),) = split.batches(64, augment="d4", seed=3)
    views = symmetry_views(images, "d4")
    transposed_only = 0
    for index in range(64):
        # undo the crop: the augmented image equals one view of the original, shifted by at most 2 px
        centre = augmented[index, 0, 2:4, 2:4]
        matches = [
            any(
                torch.equal(centre, view[index, 0, 2 + dy : 4 + dy, 2 + dx : 4 + dx])
                for dy in (-2, -1, 0, 1, 2)
                for dx in (-2, -1, 0, 1, 2)
            )
            for view in views
        ]
        assert any(matches)
        transposed_only += any(matches[4:]) and not any(matches[:4])
    assert transposed_only > 8  # about half the samples are transposed; flips alone cannot explain them


def test_symmetry_views_are_the_group_of_each_augment() -> None:
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    for augment, count in (("none", 1), ("flips", 4), ("d4", 8)):
        views = symmetry_views(images, augment)
        assert len(views) == count
        assert len({tuple(view.flatten().tolist()) for view in views}) == count  # all distinct
    with pytest.raises(ConfigError, match="augment.*'rot45'"):
        symmetry_views(images, "rot45")


def test_batches_carry_teacher_logits_aligned_with_their_samples(tiny_data: Dataset) -> None:
    split = tiny_data.train
    ids = torch.arange(len(split), dtype=torch.float32)
    marked = split.with_teacher_logits(torch.stack([ids, -ids], dim=1))
    half = marked.subset(0.5, seed=2)
    for images, labels, targets in half.batches(32, shuffle=True, seed=5, with_targets=True):
        for image, target in zip(images, targets[:, 0].long(), strict=True):
            assert torch.equal(image, split.images[target])  # the logits row belongs to this image
        assert torch.equal(labels, split.labels[targets[:, 0].long()])
    with pytest.raises(ConfigError, match="no teacher logits"):
        next(split.batches(32, with_targets=True))
    with pytest.raises(ConfigError, match="rows for a split"):
        split.with_teacher_logits(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="augment.*'sideways'"):
        next(split.batches(32, augment="sideways"))


# --- CIFAR-10 (generated files in torchvision's layout) -------------------------------------------------


def _write_fake_cifar10(root: Path, per_batch: int, test_count: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's cifar-10-batches-py layout with tiny batches; returns all train images (HWC) + labels.

    The real files are Python 2 pickles whose keys torchvision reads back (``encoding="latin1"``) as
    str, so str keys are what its loader indexes.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_rows, all_labels = [], []
    for index in range(1, 6):
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(value) for value in rng.integers(0, 10, size=per_batch)]
        with open(folder / f"data_batch_{index}", "wb") as handle:
            pickle.dump({"data": rows, "labels": labels}, handle)
        all_rows.append(rows)
        all_labels.extend(labels)
    test_rows = rng.integers(0, 256, size=(test_count, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": test_rows, "labels": [index % 10 for index in range(test_count)]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": ["airplane"] * 10, "num_vis": 3072}, handle)
    images = np.concatenate(all_rows).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(all_labels)


@pytest.fixture
def trust_fake_cifar(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our generated files cannot match torchvision's md5s: accept them."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)


@pytest.mark.usefixtures("trust_fake_cifar")
def test_cifar10_val_is_the_last_training_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "CIFAR10_VAL_SIZE", 12)
    train_images, train_labels = _write_fake_cifar10(tmp_path, per_batch=10, test_count=7)
    data = load_dataset("cifar10", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (38, 12, 7)
    assert data.num_classes == 10 and data.channels == 3 and data.image_size == 32
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert torch.equal(data.val.labels, torch.from_numpy(train_labels[-12:]).long())
    assert torch.allclose(data.val.images, data.normalize(train_images[-12:]), atol=1e-6)
    assert torch.equal(data.train.labels, torch.from_numpy(train_labels[:-12]).long())
    assert torch.allclose(data.train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_missing_cifar10_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)


# --- sizes and fingerprints --------------------------------------------------------------------------------


def test_unpublished_medmnist_size_lists_the_valid_ones(synthetic_root: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_dataset("bloodmnist", synthetic_root, size=32, verify_md5=False)
    assert "data.size: 32" in str(caught.value) and "28, 64, 128, 224" in str(caught.value)


def test_a_medmnist_file_of_another_size_is_refused(tmp_path: Path) -> None:
    source = write_synthetic_medmnist(tmp_path, sizes=(64, 16, 16))
    source.rename(tmp_path / "bloodmnist_64.npz")  # 28 px images under the 64 px name
    with pytest.raises(DataError, match="bloodmnist_64.npz should hold 64x64"):
        load_dataset("bloodmnist", tmp_path, size=64, verify_md5=False)


def test_fingerprint_is_stable_and_follows_the_content(tiny_data: Dataset, tmp_path: Path) -> None:
    assert len(tiny_data.fingerprint) == 64 and tiny_data.split_seed is None
    again = load_dataset("bloodmnist", tiny_data.source.rsplit("/", 1)[0], verify_md5=False)
    assert again.fingerprint == tiny_data.fingerprint
    write_synthetic_medmnist(tmp_path, seed=1)
    assert load_dataset("bloodmnist", tmp_path, verify_md5=False).fingerprint != tiny_data.fingerprint


def test_crop_and_hflip_augment_only_their_group(tiny_data: Dataset) -> None:
    torch.manual_seed(0)
    images = torch.randn(64, 1, 6, 6)
    split = Split(images, torch.zeros(64, dtype=torch.long))
    ((cropped, _),) = split.batches(64, augment="crop", seed=3)
    ((flipped, _),) = split.batches(64, augment="hflip", seed=3)
    for index in range(64):
        centre = cropped[index, 0, 2:4, 2:4]
        assert any(  # a shifted copy of the image itself, never a mirrored one
            torch.equal(centre, images[index, 0, 2 + dy : 4 + dy, 2 + dx : 4 + dx])
            for dy in (-2, -1, 0, 1, 2)
            for dx in (-2, -1, 0, 1, 2)
        )
    mirrored = sum(not torch.equal(flipped[index], cropped[index]) for index in range(64))
    assert mirrored > 16  # the same crops (same seed), about half of them mirrored
    for index in range(64):  # each is its crop, or that crop mirrored left-right
        assert torch.equal(flipped[index], cropped[index]) or torch.equal(
            flipped[index], cropped[index].flip(-1)
        )
