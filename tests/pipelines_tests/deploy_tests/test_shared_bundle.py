"""A shared-trunk MoE as a bundle: trunk / gate / expert files, model.onnx and the numpy runtime agree with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.deploy.bundle import agreement, deploy_moe
from pipelines.deploy.latency_model import LatencyTable, predict_deployed
from pipelines.deploy.runtime import load_bundle, load_single_file
from pipelines.errors import ConfigError
from pipelines.moe import MoEConfig, SharedTrunkMoE, build_moe
from tests.pipelines_tests.deploy_tests.support import (
    CALIBRATION,
    _bake_on_grid,
    _classifier,
    _recalibrate_batchnorm,
)


def _shared_moe(images: torch.Tensor, labels: torch.Tensor, views: int) -> SharedTrunkMoE:
    """Three fitted classifiers split at stage 1: the trunk of the first, each expert the tail of one of them
    (their stage-1 weights differ, so the tails disagree a little), a gate fitted to the trunk's features."""
    cfg = MoEConfig(num_experts=3, top_k=2, gate_size=4, layout="shared", split_at=1, views=views)
    moe = build_moe(_classifier(100, images, labels), 3, cfg)
    for index, expert in enumerate(moe.experts[1:], start=1):
        donor = build_moe(_classifier(100 + index, images, labels), 3, cfg)
        expert.load_state_dict(donor.experts[0].state_dict())
    _bake_on_grid(moe, 6)
    gate = moe.gate
    features = moe.trunk.eval()(images).detach()
    _recalibrate_batchnorm(gate, features)
    with torch.no_grad():  # fit the gate's scores to class groups (label mod 3): routing follows the input
        pooled = torch.flatten(gate.pool(gate.relu(gate.bn(gate.conv(features)))), 1)
        design = torch.cat([pooled, torch.ones(len(pooled), 1)], dim=1)
        targets = torch.nn.functional.one_hot(labels % 3, 3).float() * 6 - 2
        solution = torch.linalg.solve(
            design.T @ design + 0.1 * torch.eye(design.shape[1]), design.T @ targets
        )
        gate.fc.weight.copy_(solution[:-1].T)
        gate.fc.bias.copy_(solution[-1])
    return moe.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["views1", "views2"])
def shared_bundle(request, tmp_path_factory: pytest.TempPathFactory, data) -> tuple[SharedTrunkMoE, Path]:
    images, labels = data
    moe = _shared_moe(images[:CALIBRATION], labels[:CALIBRATION], request.param)
    folder = tmp_path_factory.mktemp("shared")
    deploy_moe(moe, folder, images[:CALIBRATION])
    return moe, folder


def test_the_bundle_holds_the_trunk_and_says_its_layout(shared_bundle) -> None:
    moe, folder = shared_bundle
    manifest = load_bundle(folder).manifest
    assert manifest.layout == "shared"
    assert {"trunk.onnx", "trunk.int8.onnx", "gate.int8.onnx", "expert_2.int8.onnx", "model.onnx"} <= set(
        manifest.files
    )


def test_model_onnx_and_the_numpy_runtime_match_torch_on_a_mixed_batch(shared_bundle, data) -> None:
    moe, folder = shared_bundle
    images = data[0][CALIBRATION:]  # held out
    with torch.no_grad():
        chosen = moe.route(images)[1]
    assert len(set(chosen[:, 0].tolist())) >= 2  # a mixed batch: several experts chosen first
    bundle, single = load_bundle(folder), load_single_file(folder)
    for engine_model in (bundle, single):
        result = agreement(moe, engine_model, images)
        assert result["top1_agreement"] >= 0.95
    # one file and the numpy routing run the same int8 graphs: equal up to float rounding
    assert np.allclose(bundle(images.numpy()), single(images.numpy()), atol=1e-4)
    assert "trunk" in bundle.last_timing


def test_fp32_files_match_torch_exactly(shared_bundle, data) -> None:
    moe, folder = shared_bundle
    images = data[0][CALIBRATION:]
    fp32 = load_bundle(folder, precision="fp32")
    assert agreement(moe, fp32, images)["max_abs_diff"] < 1e-3


def test_predicted_latency_refuses_the_shared_layout(shared_bundle, tmp_path: Path) -> None:
    _, folder = shared_bundle
    with pytest.raises(ConfigError, match="measure.latency.*shared"):
        predict_deployed(folder, LatencyTable(cpu="x", engine="onnxruntime", engine_version="0", threads=1))


def test_a_one_expert_shared_moe_deploys(data, tmp_path: Path) -> None:
    images, labels = data
    moe = build_moe(
        _classifier(0, images[:CALIBRATION], labels[:CALIBRATION]),
        3,
        MoEConfig(num_experts=1, layout="shared", split_at=2),
    ).eval()
    deploy_moe(moe, tmp_path, images[:CALIBRATION], int8=False)
    assert agreement(moe, load_single_file(tmp_path), images)["max_abs_diff"] < 1e-3
