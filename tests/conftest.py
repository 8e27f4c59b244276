"""Shared fixtures: a learnable synthetic BloodMNIST-format file, deterministic 2-thread torch."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data import Dataset, load_dataset
from tests.helpers import write_synthetic_medmnist

# The CI machines have 2 cores; more threads only add contention between intra-op workers.
torch.set_num_threads(int(__import__("os").environ.get("T", "2")))

SEED = 0


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same random state, so results do not depend on test order."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``bloodmnist.npz``: 320/96/96 RGB 28x28 images, 8 learnable classes."""
    folder = tmp_path_factory.mktemp("medmnist")
    write_synthetic_medmnist(folder)
    return folder


@pytest.fixture
def synthetic_writer() -> Callable[..., Path]:
    """:func:`tests.helpers.write_synthetic_medmnist`, for tests that build their own variants."""
    return write_synthetic_medmnist


@pytest.fixture(scope="session")
def tiny_data(synthetic_root: Path) -> Dataset:
    """The synthetic BloodMNIST loaded through the real loader (md5 check off: the file is ours)."""
    return load_dataset("bloodmnist", synthetic_root, verify_md5=False)
