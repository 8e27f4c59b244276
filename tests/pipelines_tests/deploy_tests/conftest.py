"""Fixtures of the deploy tests: data, a fitted classifier, int8 / fp32 bundles of a 3-expert MoE, and a
shared-trunk bundle (views 1 and 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.deploy.bundle import deploy_moe
from pipelines.moe import MixtureOfExperts, SharedTrunkMoE
from tests.helpers import synthetic_images
from tests.pipelines_tests.deploy_tests.support import (
    CALIBRATION,
    NUM_CLASSES,
    _classifier,
    _moe,
    _shared_moe,
)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """128 normalized synthetic 3x28x28 images of 8 classes, and their labels."""
    labels = torch.arange(2 * CALIBRATION) % NUM_CLASSES
    raw = synthetic_images(labels.numpy(), 3, NUM_CLASSES, np.random.default_rng(0))
    images = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25).contiguous()
    return images, labels


@pytest.fixture(scope="module")
def classifier(data: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    images, labels = data
    return _classifier(0, images[:CALIBRATION], labels[:CALIBRATION])


@pytest.fixture(scope="module")
def int8_bundle(
    tmp_path_factory: pytest.TempPathFactory, data: tuple[torch.Tensor, torch.Tensor]
) -> tuple[MixtureOfExperts, Path, dict]:
    """A top-2 MoE deployed with fp32 and int8 files: (torch MoE, bundle folder, manifest)."""
    images, labels = data
    moe = _moe(2, images[:CALIBRATION], labels[:CALIBRATION])
    folder = tmp_path_factory.mktemp("bundle_int8")
    manifest = deploy_moe(moe, folder, images[:CALIBRATION], extra_manifest={"trial": 7})
    return moe, folder, manifest


@pytest.fixture(scope="module")
def fp32_bundle(
    tmp_path_factory: pytest.TempPathFactory, data: tuple[torch.Tensor, torch.Tensor]
) -> tuple[MixtureOfExperts, Path, dict]:
    """A top-1 MoE deployed with fp32 files only."""
    images, labels = data
    moe = _moe(1, images[:CALIBRATION], labels[:CALIBRATION])
    folder = tmp_path_factory.mktemp("bundle_fp32")
    return moe, folder, deploy_moe(moe, folder, images[:CALIBRATION], int8=False)


@pytest.fixture(scope="module", params=[1, 2], ids=["views1", "views2"])
def shared_bundle(request, tmp_path_factory: pytest.TempPathFactory, data) -> tuple[SharedTrunkMoE, Path]:
    """A top-2, 3-expert shared-trunk MoE deployed int8 with 1 and 2 test-time views: (torch MoE, folder)."""
    images, labels = data
    moe = _shared_moe(images[:CALIBRATION], labels[:CALIBRATION], request.param)
    folder = tmp_path_factory.mktemp("shared")
    deploy_moe(moe, folder, images[:CALIBRATION])
    return moe, folder
