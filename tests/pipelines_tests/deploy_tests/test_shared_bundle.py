"""A shared-trunk MoE as a bundle: trunk / gate / expert files, model.onnx and the numpy runtime agree with torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.deploy.bundle import agreement, deploy_moe
from pipelines.deploy.latency_model import predict_deployed
from pipelines.deploy.latency_table import LatencyTable
from pipelines.deploy.runtime import load_bundle, load_single_file
from pipelines.errors import ConfigError
from pipelines.moe import MoEConfig, build_moe
from tests.pipelines_tests.deploy_tests.support import (
    CALIBRATION,
    _classifier,
)


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
