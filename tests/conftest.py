"""Shared fixtures: a learnable synthetic BloodMNIST-format file; single-threaded, seeded torch."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data import Dataset, load_dataset
from tests.helpers import write_synthetic_medmnist

# One intra-op thread: the tests' tiny models gain nothing from more, and on a shared 2-core machine
# two OpenMP workers spin against other processes (measured: this suite 15 s with 1 thread, 136 s
# with 2, at load average 4). Tests that time things set their own thread count.
torch.set_num_threads(1)

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
