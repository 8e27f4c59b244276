"""pipelines.symmetry_probe: the probe drops symmetries that change labels and keeps those that do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data import Split, symmetry_views
from pipelines.errors import ConfigError
from pipelines.symmetry_probe import D4_ELEMENTS, ProbeConfig, probe_symmetries, resolve_augment
from pipelines.train import TrainConfig, ensemble_logits, train

FAST = ProbeConfig(train_samples=600, val_samples=300, epochs=4, batch_size=32, width=8)
SIZE = 16


def _blobs(count: int, label_is_side: bool, seed: int) -> Split:
    """Grey images with one bright blob. ``label_is_side``: the label is the blob's side (left 0, right 1),
    which a horizontal flip swaps; else the label is its brightness, which no symmetry changes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    images = np.empty((count, 1, SIZE, SIZE), dtype=np.float32)
    for index, label in enumerate(labels):
        row = rng.integers(2, SIZE - 2)
        if label_is_side:
            col = rng.integers(2, 6) if label == 0 else rng.integers(SIZE - 6, SIZE - 2)
            level = 1.0
        else:
            col = rng.integers(2, SIZE - 2)
            level = 0.4 if label == 0 else 1.0
        images[index, 0] = level * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / 4.0)
    images += rng.normal(0, 0.05, size=images.shape).astype(np.float32)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def test_d4_elements_are_named_after_what_they_do() -> None:
    image = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dict(zip(D4_ELEMENTS, symmetry_views(image, "d4"), strict=True))
    assert torch.equal(views["hflip"], image.flip(-1)) and torch.equal(views["vflip"], image.flip(-2))
    assert torch.equal(views["rot180"], torch.rot90(image, 2, dims=(-2, -1)))
    assert torch.equal(views["transpose"], image.transpose(-1, -2))
    assert torch.equal(views["rot90"], torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(views["rot270"], torch.rot90(image, 3, dims=(-2, -1)))
    assert torch.equal(views["antitranspose"], torch.rot90(image, 2, dims=(-2, -1)).transpose(-1, -2))


def test_probe_drops_horizontal_flips_when_the_label_is_the_side() -> None:
    probe = probe_symmetries(_blobs(600, True, 0), _blobs(300, True, 1), 2, FAST)
    assert probe.conclusive and probe.accuracy > 0.9
    assert "hflip" not in probe.kept and probe.view_accuracy["hflip"] < 0.2  # flipped sides swap labels
    assert "vflip" in probe.kept  # up and down do not matter here
    assert probe.augment == "crop"  # no group without hflip but with vflip is offered: crop, not a half group
    assert probe.margin == FAST.margin and probe.seconds > 0 and probe.train_samples == 600


def test_probe_keeps_every_symmetry_when_the_label_ignores_orientation() -> None:
    probe = probe_symmetries(_blobs(600, False, 0), _blobs(300, False, 1), 2, FAST)
    assert probe.conclusive and probe.accuracy > 0.9
    assert probe.kept == D4_ELEMENTS[1:] and probe.augment == "d4"
    record = probe.to_dict()
    assert record["augment"] == "d4" and set(record["view_accuracy"]) == set(D4_ELEMENTS[1:])
    assert "d4" in probe.summary() and "+hflip" in probe.summary()


def _rare_lateral_classes(count: int, seed: int) -> Split:
    """Classes 0 and 1 (dim or bright blob anywhere) hold about 97% of the images; the rare classes 2 and
    3 are a vertical bar at the left or the right edge, which a horizontal flip swaps."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(4, size=count, p=[0.485, 0.485, 0.015, 0.015])
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    images = np.zeros((count, 1, SIZE, SIZE), dtype=np.float32)
    for index, label in enumerate(labels):
        if label < 2:
            row, col = rng.integers(2, SIZE - 2, size=2)
            level = 0.4 if label == 0 else 1.0
            images[index, 0] = level * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / 4.0)
        else:
            left = 1 if label == 2 else SIZE - 3
            images[index, 0, 3:-3, left : left + 2] = 1.0
    images += rng.normal(0, 0.05, size=images.shape).astype(np.float32)
    return Split(torch.from_numpy(images), torch.from_numpy(labels))


def test_a_symmetry_that_scrambles_only_rare_classes_is_dropped() -> None:
    """Overall accuracy barely moves under a horizontal flip (3% of the images change class); the
    class-balanced accuracy falls by half, and that is what drops it."""
    train_split, val_split = _rare_lateral_classes(1600, 0), _rare_lateral_classes(1600, 1)
    config = ProbeConfig(train_samples=1600, val_samples=1600, epochs=6, batch_size=32, width=8)
    probe = probe_symmetries(train_split, val_split, 4, config)
    assert probe.conclusive and probe.accuracy > 0.9 and probe.balanced_accuracy > 0.9
    assert probe.accuracy - probe.view_accuracy["hflip"] <= config.margin  # accuracy alone would keep it
    assert probe.balanced_accuracy - probe.view_balanced_accuracy["hflip"] > 0.3
    assert "hflip" not in probe.kept and "vflip" in probe.kept and probe.augment == "crop"


def test_a_small_validation_split_is_topped_up_with_unseen_training_images() -> None:
    probe = probe_symmetries(_blobs(600, True, 0), _blobs(20, True, 1), 2, FAST)
    assert probe.val_samples == 20 + 120  # a fifth of train kept back, scored beside val
    assert probe.train_samples == 480  # and not trained on
    large_val = probe_symmetries(_blobs(600, True, 0), _blobs(300, True, 1), 2, FAST)
    assert (large_val.train_samples, large_val.val_samples) == (600, 300)  # enough val: nothing kept back


def test_probe_is_deterministic() -> None:
    first = probe_symmetries(_blobs(200, True, 0), _blobs(100, True, 1), 2, FAST)
    again = probe_symmetries(_blobs(200, True, 0), _blobs(100, True, 1), 2, FAST)
    assert first.view_accuracy == again.view_accuracy and first.kept == again.kept


def test_a_probe_that_learns_nothing_picks_crop() -> None:
    noise = Split(torch.randn(200, 1, SIZE, SIZE), torch.arange(200) % 2)
    probe = probe_symmetries(noise, Split(torch.randn(100, 1, SIZE, SIZE), torch.arange(100) % 2), 2, FAST)
    assert not probe.conclusive and probe.augment == "crop"


def test_resolve_augment_passes_named_groups_through(tiny_data) -> None:
    assert resolve_augment("flips", tiny_data) == ("flips", None)
    with pytest.raises(ConfigError, match="auto, none, crop"):
        resolve_augment("sideways", tiny_data)


def test_train_resolves_auto_with_the_probe_and_reports_it() -> None:
    split = _blobs(400, True, 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 2))
    report = train(model, split, TrainConfig(epochs=1, batch_size=32, augment="auto"))
    assert report.probe is not None and report.augment == report.probe.augment == "crop"
    # the 20% holdout of the training split (80), topped up with 64 images kept back from the other 320
    assert report.probe.val_samples == 144 and report.probe.train_samples == 256
    plain = train(model, split, TrainConfig(epochs=1, batch_size=32, augment="hflip"))
    assert plain.probe is None and plain.augment == "hflip"


def test_views_follow_the_chosen_group_only() -> None:
    images = torch.randn(3, 1, 4, 4)
    assert [len(symmetry_views(images, name)) for name in ("none", "crop", "hflip", "flips", "d4")] == [
        1,
        1,
        2,
        4,
        8,
    ]
    assert torch.equal(symmetry_views(images, "hflip")[1], images.flip(-1))
    with pytest.raises(ConfigError, match="resolve it first"):
        symmetry_views(images, "auto")
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    split = Split(images, torch.zeros(3, dtype=torch.long))
    expected = (teacher(images) + teacher(images.flip(-1))) / 2
    assert torch.allclose(ensemble_logits(teacher, split, "hflip"), expected, atol=1e-6)
    assert torch.allclose(ensemble_logits(teacher, split, "crop"), teacher(images), atol=1e-6)
