"""Synthetic datasets for tests: small MedMNIST-format files whose classes a tiny CNN can learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_synthetic_medmnist", "synthetic_images", "recorded"]

_SPLITS = ("train", "val", "test")


def _class_style(num_classes: int, channels: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Per class: a background tint (one value per channel) and the centre of a bright blob."""
    palette = np.random.default_rng(1234).uniform(40, 200, size=(num_classes, channels))
    if channels == 1:
        # Grey: spread background levels evenly so every class has its own brightness.
        palette[:, 0] = np.linspace(30, 170, num_classes)
    grid = [(row, col) for row in (6, 14, 22) for col in (6, 14, 22)]
    centres = [grid[index % len(grid)] for index in range(num_classes)]
    return palette, centres


def synthetic_images(
    labels: np.ndarray, channels: int, num_classes: int, rng: np.random.Generator, size: int = 28
) -> np.ndarray:
    """(N, size, size, channels) uint8 images: a class tint, a class-placed blob, and noise."""
    palette, centres = _class_style(num_classes, channels)
    rows, cols = np.mgrid[0:size, 0:size]
    images = np.empty((len(labels), size, size, channels), dtype=np.float64)
    for index, label in enumerate(labels):
        centre_row, centre_col = centres[int(label)]
        jitter_row, jitter_col = rng.integers(-1, 2, size=2)
        distance = (rows - centre_row - jitter_row) ** 2 + (cols - centre_col - jitter_col) ** 2
        blob = 255.0 * np.exp(-distance / (2 * 3.0**2))
        images[index] = palette[int(label)] + blob[..., None] * 0.8
    images += rng.normal(0.0, 12.0, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_synthetic_medmnist(
    folder: str | Path,
    name: str = "bloodmnist",
    channels: int = 3,
    num_classes: int = 8,
    sizes: tuple[int, int, int] = (320, 96, 96),
    seed: int = 0,
) -> Path:
    """Write ``folder/name.npz`` in MedMNIST's layout (uint8 images (N, 28, 28, C), labels (N, 1)).

    Classes are balanced and visually distinct, so a resnet8 learns them in a couple of epochs.
    Returns the file's path. Its md5 is not medmnist's: load it with ``verify_md5=False``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(_SPLITS, sizes, strict=True):
        labels = rng.permutation(np.arange(count) % num_classes)
        images = synthetic_images(labels, channels, num_classes, rng)
        arrays[f"{split}_images"] = images if channels > 1 else images[..., 0]
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    path = folder / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def made_up_record(
    *,
    accuracy: float = 0.9,
    mmacs: float = 1.0,
    size_kb: float = 10.0,
    stages: dict[str, float] | None = None,
    reference: str = "",
    repeat_of: int | None = None,
    config: dict | None = None,
    seconds: dict[str, float] | None = None,
):
    """A measured trial's ``search.record.TrialRecord`` with made-up numbers, for studies built from known
    points without training."""
    from search.record import Measurement, Training, TrialRecord

    measurement = Measurement(
        val_accuracy=accuracy,
        val_accuracy_torch=accuracy,
        mmacs=mmacs,
        latency_ms=0.1,
        latency={"backend": "onnxruntime-int8", "threads": 1, "median_ms": 0.1},
        routing_share=0.1,
        size_kb=size_kb,
        params=1000,
        bits=8,
        precision="int8",
        top1_agreement_with_torch=1.0,
        routing_per_class=[],
        effective_top_k=1,
    )
    training = Training(
        expert_params=500, achieved_sparsity=0.5, class_assignment=None, stage_val_accuracy=stages or {}
    )
    return TrialRecord(
        config=config,
        reference=reference,
        repeat_of=repeat_of,
        trained=repeat_of is None,
        training=training,
        measurement=measurement,
        seconds=seconds or {"total": 1.0},
    )


def recorded(
    *, size_kb: float = 10.0, reference: str = "", repeat_of: int | None = None, config: dict | None = None
) -> dict:
    """The user attributes of a measured trial with made-up numbers (:func:`made_up_record`); the
    objectives are the trial's own values."""
    return made_up_record(
        size_kb=size_kb, reference=reference, repeat_of=repeat_of, config=config
    ).user_attrs()
