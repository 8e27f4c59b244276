"""pipelines.deploy.runtime: ONNX Runtime sessions, the numpy MoE routing, loading and timing a bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pipelines.deploy.bundle import agreement
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel, OrtMoE, load_bundle, measure_moe_latency
from pipelines.errors import ConfigError
from tests.pipelines_tests.deploy_tests.support import _CountingModel


def test_ort_model_rejects_bad_threads(classifier: nn.Module, data, tmp_path: Path) -> None:
    path = export_onnx(classifier, data[0][:2], tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="threads"):
        OrtModel(path, threads=0)


@pytest.mark.parametrize("which", ["fp32_bundle", "int8_bundle"])
def test_ort_moe_fp32_matches_torch_moe(which: str, request: pytest.FixtureRequest, data) -> None:
    moe, folder, _ = request.getfixturevalue(which)
    images = data[0]
    bundle = load_bundle(folder, threads=2, precision="fp32")
    assert bundle.precision == "fp32" and bundle.top_k == moe.top_k
    with torch.no_grad():
        _, torch_chosen, torch_weights = moe.route(images)
    assert len(torch.unique(torch_chosen[:, 0])) >= 2, "the test MoE should route to several experts"
    chosen, weights = bundle.route(images.numpy())
    assert chosen.shape == weights.shape == (len(images), moe.top_k)
    np.testing.assert_array_equal(chosen, torch_chosen.numpy())
    np.testing.assert_allclose(weights, torch_weights.numpy(), atol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    result = agreement(moe, bundle, images)
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0


def test_ort_moe_runs_each_used_expert_once_on_its_samples(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    bundle = load_bundle(folder, precision="fp32")
    images = data[0].numpy()
    counters = [_CountingModel(expert) for expert in bundle.experts]
    reference = bundle(images)
    bundle.experts = counters
    np.testing.assert_array_equal(bundle(images), reference)
    chosen, _ = bundle.route(images)
    for expert_id, counter in enumerate(counters):
        routed = int((chosen == expert_id).any(axis=1).sum())
        assert counter.calls == ([routed] if routed else [])
    assert set(bundle.last_timing) == {"gate_and_routing", "experts", "total"}
    assert 0 <= bundle.last_timing["experts"] <= bundle.last_timing["total"]


def test_precision_errors(fp32_bundle) -> None:
    _, folder, manifest = fp32_bundle
    assert manifest.precision == "fp32" and manifest.calibration == {}
    assert not any(name.endswith(".int8.onnx") for name in manifest.files)
    with pytest.raises(ConfigError, match="no int8 files"):
        load_bundle(folder, precision="int8")
    with pytest.raises(ConfigError, match="precision"):
        load_bundle(folder, precision="int4")


def test_measure_latency_of_bundle_and_single_model(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    images = data[0].numpy()
    bundle = load_bundle(folder, threads=2)
    result = measure_moe_latency(bundle, images, threads=2, batch=16, repeats=5, warmup=1)
    latency = result["latency"]
    assert latency["backend"] == f"onnxruntime {ort.__version__} int8 (CPU)"
    assert (result["engine"], result["engine_version"], result["precision"]) == (
        "onnxruntime",
        ort.__version__,
        "int8",
    )
    assert (result["threads"], result["batch"]) == (2, 16)
    assert (latency["threads"], latency["batch"], latency["repeats"]) == (2, 16, 5)
    assert 0 < latency["p10_ms"] <= latency["median_ms"] <= latency["p90_ms"]
    assert 0.0 <= result["routing_share"] <= 1.0
    with pytest.raises(ConfigError, match="threads"):
        measure_moe_latency(bundle, images, threads=1, batch=16)
    single = measure_moe_latency(bundle.experts[0], images, threads=2, batch=1, repeats=3, warmup=0)
    assert single["routing_share"] is None and single["latency"]["batch"] == 1


def test_ort_moe_validates_its_parts(int8_bundle) -> None:
    _, folder, _ = int8_bundle
    bundle = load_bundle(folder, precision="fp32")
    with pytest.raises(ConfigError, match="top_k"):
        OrtMoE(bundle.gate, bundle.experts, top_k=4)
    with pytest.raises(ConfigError, match="gate"):
        OrtMoE(bundle.gate, bundle.experts[:2], top_k=1)
