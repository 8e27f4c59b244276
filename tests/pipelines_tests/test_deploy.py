"""ONNX export, ONNX Runtime int8 quantization and the ONNX-Runtime-only Mixture-of-Experts bundle.

Models are not trained (too slow for unit tests): each resnet8 gets BatchNorm statistics from the images
and a closed-form ridge-regression classifier on its pooled features, which gives well-separated,
correct logits on the synthetic classes. Experts get different random seeds, so a routing mistake in
the ONNX Runtime MoE shows up as a logit difference.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.deploy import (
    OrtModel,
    OrtMoE,
    agreement,
    deploy_moe,
    export_onnx,
    load_bundle,
    measure_moe_latency,
    quantize_onnx_int8,
)
from pipelines.errors import ConfigError, UntrustedFileError
from pipelines.models import build_model
from pipelines.moe import MixtureOfExperts, MoEConfig, build_moe
from pipelines.serialize import sha256_file
from tests.helpers import synthetic_images

NUM_CLASSES = 8
CALIBRATION = 64  # the first 64 images calibrate and fit; the other 64 are held out


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """128 normalized synthetic 3x28x28 images of 8 classes, and their labels."""
    labels = torch.arange(2 * CALIBRATION) % NUM_CLASSES
    raw = synthetic_images(labels.numpy(), 3, NUM_CLASSES, np.random.default_rng(0))
    images = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25).contiguous()
    return images, labels


def _recalibrate_batchnorm(module: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images`` (one cumulative pass)."""
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    module.train()
    with torch.no_grad():
        module(images)
    module.eval()


def _fit_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0) -> None:
    """Replace ``model.fc`` by the ridge-regression fit of pooled features to +-1 class targets."""
    captured: dict[str, torch.Tensor] = {}
    handle = model.pool.register_forward_hook(
        lambda _m, _i, out: captured.update(features=torch.flatten(out, 1))
    )
    with torch.no_grad():
        model(images)
        handle.remove()
        features = torch.cat([captured["features"], torch.ones(len(images), 1)], dim=1)
        targets = F.one_hot(labels, NUM_CLASSES).float() * NUM_CLASSES - 1
        regularized = features.T @ features + ridge * torch.eye(features.shape[1])
        solution = torch.linalg.solve(regularized, features.T @ targets)
        model.fc.weight.copy_(solution[:-1].T)
        model.fc.bias.copy_(solution[-1])


def _classifier(seed: int, images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet8", 3, NUM_CLASSES)
    _recalibrate_batchnorm(model, images)
    _fit_classifier(model, images, labels)
    return model.eval()


def _moe(top_k: int, images: torch.Tensor, labels: torch.Tensor) -> MixtureOfExperts:
    """Three different experts behind a gate whose routing depends on the input."""
    moe = build_moe(
        build_model("resnet8", 3, NUM_CLASSES), 3, MoEConfig(num_experts=3, top_k=top_k, gate_size=4)
    )
    for index, expert in enumerate(moe.experts):
        expert.load_state_dict(_classifier(100 + index, images, labels).state_dict())
    _recalibrate_batchnorm(moe.gate, images)
    with torch.no_grad():
        moe.gate.fc.bias.zero_()  # otherwise the bias dominates and every sample goes to one expert
    return moe.eval()


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


# --- single models -------------------------------------------------------------------------------


def test_export_matches_torch_at_any_batch_size(classifier: nn.Module, data, tmp_path: Path) -> None:
    images, _ = data
    classifier.train()  # export must use eval mode and leave the mode as it was
    path = export_onnx(classifier, images[:2], tmp_path / "model.onnx")
    assert classifier.training
    classifier.eval()
    graph = onnx.load(str(path)).graph
    assert [node.name for node in graph.input] == ["input"] and [node.name for node in graph.output] == [
        "output"
    ]
    model = OrtModel(path, threads=2)
    assert model.precision == "fp32" and model.num_outputs == NUM_CLASSES
    for batch in (1, 5, 128):
        with torch.no_grad():
            expected = classifier(images[:batch]).numpy()
        actual = model(images[:batch].numpy())
        assert actual.shape == (batch, NUM_CLASSES)
        assert np.abs(actual - expected).max() < 1e-4


def test_int8_single_model_is_smaller_and_agrees(classifier: nn.Module, data, tmp_path: Path) -> None:
    images, labels = data
    fp32_path = export_onnx(classifier, images[:2], tmp_path / "model.onnx")
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "model.int8.onnx", images[:CALIBRATION])
    operators = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    assert int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size  # int8 weights, not fp32
    # the classifier (last Gemm) reads dequantized features but keeps fp32 weights and an fp32 output
    graph = onnx.load(str(int8_path)).graph
    last = [node for node in graph.node if node.op_type in ("Gemm", "MatMul")][-1]
    float_initializers = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    assert last.input[1] in float_initializers
    assert not any(node.op_type == "QuantizeLinear" and last.output[0] in node.input for node in graph.node)
    model = OrtModel(int8_path, threads=1)
    assert model.precision == "int8"
    held_out = images[CALIBRATION:]
    with torch.no_grad():
        assert (
            classifier(held_out).argmax(1) == labels[CALIBRATION:]
        ).float().mean() == 1.0  # well separated
    result = agreement(classifier, model, held_out)
    # Measured: agreement 1.0, max |diff| 0.57 on logits whose top-2 margin has median 6.7.
    assert result["top1_agreement"] >= 0.95
    assert 0 < result["max_abs_diff"] < 1.5


def _bake_on_grid(model: nn.Module, bits: int) -> nn.Module:
    """Round each Conv/Linear output channel to symmetric ``bits``-bit levels, as NNI's bake does."""
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                weight = module.weight
                scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True) / levels
                weight.copy_(torch.round(weight / scale).clamp(-levels, levels) * scale)
    return model


def _engine_weight_errors(fp32_path: Path, int8_path: Path) -> list[float]:
    """For each conv of the fp32 file, in graph order: max |engine weight - fp32 weight| / max |fp32 weight|,
    the engine weight being its int8 or uint8 levels minus zero point, times the per-channel scale."""
    fp32_graph, int8_graph = onnx.load(str(fp32_path)).graph, onnx.load(str(int8_path)).graph
    arrays = {init.name: onnx.numpy_helper.to_array(init) for init in int8_graph.initializer}
    engine = []
    for node in int8_graph.node:
        levels = arrays.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if levels is not None and levels.dtype in (np.int8, np.uint8) and levels.ndim == 4:
            zero = arrays[node.input[2]].astype(np.float64).reshape(-1, 1, 1, 1)
            engine.append((levels.astype(np.float64) - zero) * arrays[node.input[1]].reshape(-1, 1, 1, 1))
    sources = {init.name: onnx.numpy_helper.to_array(init) for init in fp32_graph.initializer}
    errors = []
    for node in fp32_graph.node:  # names change in pre-processing: match by shape and closeness
        if node.op_type == "Conv":
            source = sources[node.input[1]].astype(np.float64)
            errors.append(
                min(
                    np.abs(w - source).max() / np.abs(source).max() for w in engine if w.shape == source.shape
                )
            )
    assert len(engine) == len(errors) > 0
    return errors


@pytest.mark.parametrize(
    "bits,wide_weights,exact",
    [
        (4, "first", "all"),
        (6, "none", "all"),
        (8, "none", "none"),  # 255 levels do not fit the fast kernels' [-64, 64]
        (8, "first", "first"),  # the conv reading the image is held as uint8, the others rounded
        (8, "all", "all"),
    ],
)
def test_int8_engine_holds_nni_weight_grid_exactly(
    classifier: nn.Module, data, tmp_path: Path, bits: int, wide_weights: str, exact: str
) -> None:
    """Weights NNI left on <= 129 levels reach the engine unchanged; 8-bit ones where ``wide_weights`` says."""
    images = data[0]
    model = _bake_on_grid(copy.deepcopy(classifier), bits).eval()
    fp32_path = export_onnx(model, images[:2], tmp_path / "model.onnx")
    int8_path = quantize_onnx_int8(
        fp32_path, tmp_path / "model.int8.onnx", images[:CALIBRATION], wide_weights=wide_weights
    )
    errors = _engine_weight_errors(fp32_path, int8_path)
    expected_exact = {"all": [True] * len(errors), "none": [False] * len(errors)}.get(
        exact, [True] + [False] * (len(errors) - 1)
    )
    for error, is_exact in zip(errors, expected_exact, strict=True):
        if is_exact:
            assert error < 1e-5
        else:  # rounded to the engine's grid: off by at most half its step (absmax / 128)
            assert 1e-4 < error <= 0.5 / 64 + 1e-6
    with pytest.raises(ConfigError, match="wide_weights"):
        quantize_onnx_int8(fp32_path, tmp_path / "x.onnx", images[:CALIBRATION], wide_weights="some")


def test_ort_model_rejects_bad_threads(classifier: nn.Module, data, tmp_path: Path) -> None:
    path = export_onnx(classifier, data[0][:2], tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="threads"):
        OrtModel(path, threads=0)


# --- Mixture of Experts -----------------------------------------------------------------------------


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


class _CountingModel:
    """Wraps an OrtModel and records the batch size of every call."""

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        return self.model(images)


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


def test_manifest_records_files_calibration_and_extras(int8_bundle, data) -> None:
    moe, folder, manifest = int8_bundle
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert manifest["format_version"] == 1 and manifest["kind"] == "hycomp-moe"
    assert (manifest["top_k"], manifest["num_experts"]) == (2, 3)
    assert manifest["input_shape"] == [3, 28, 28] and manifest["precision"] == "int8"
    assert manifest["trial"] == 7
    expected_files = {"gate.onnx", "gate.int8.onnx"} | {
        f"expert_{index}{suffix}" for index in range(3) for suffix in (".onnx", ".int8.onnx")
    }
    assert set(manifest["files"]) == expected_files
    for name, digest in manifest["files"].items():
        assert sha256_file(folder / name) == digest
    # Each int8 expert saw the images routed to it, or all of them when fewer than 32 were.
    with torch.no_grad():
        _, chosen, _ = moe.route(data[0][:CALIBRATION])
    for expert_id in range(3):
        routed = int((chosen == expert_id).any(dim=1).sum())
        assert manifest["calibration"][f"expert_{expert_id}.int8.onnx"] == (
            routed if routed >= 32 else CALIBRATION
        )
    assert manifest["calibration"]["gate.int8.onnx"] == CALIBRATION
    # The test MoE is not quantized by NNI: its fp32 weights are on no grid, so the engine rounds them all.
    assert set(manifest["weight_grid"]) == {name for name in expected_files if name.endswith(".int8.onnx")}
    for counts in manifest["weight_grid"].values():
        assert counts["exact"] == 0 and counts["rounded"] >= 2


def test_int8_bundle_agrees_with_torch(int8_bundle, data) -> None:
    moe, folder, _ = int8_bundle
    images, labels = data
    bundle = load_bundle(folder, threads=1)  # the manifest's precision: int8
    assert bundle.precision == "int8" and bundle.manifest is not None
    output = bundle(images[CALIBRATION:].numpy())
    assert output.shape == (CALIBRATION, NUM_CLASSES) and output.dtype == np.float32
    result = agreement(moe, bundle, images[CALIBRATION:])
    # Measured 1.0: int8 may flip a borderline routing decision, but every expert is a good classifier.
    assert result["top1_agreement"] >= 0.95
    assert (output.argmax(axis=1) == labels[CALIBRATION:].numpy()).mean() >= 0.95


def test_tampered_file_is_refused(int8_bundle, tmp_path: Path) -> None:
    _, folder, _ = int8_bundle
    copy = shutil.copytree(folder, tmp_path / "bundle")
    target = copy / "expert_1.int8.onnx"
    content = bytearray(target.read_bytes())
    content[-10] ^= 0xFF
    target.write_bytes(bytes(content))
    with pytest.raises(UntrustedFileError, match=r"expert_1\.int8\.onnx"):
        load_bundle(copy)
    assert load_bundle(copy, precision="fp32").precision == "fp32"  # only the files it loads are checked


@pytest.mark.parametrize(
    "manifest_text",
    [None, "{not json", json.dumps([1, 2]), json.dumps({"format_version": 1, "kind": "hycomp-moe"})],
    ids=["missing", "not-json", "not-object", "incomplete"],
)
def test_missing_or_malformed_manifest_is_refused(
    int8_bundle, tmp_path: Path, manifest_text: str | None
) -> None:
    copy = shutil.copytree(int8_bundle[1], tmp_path / "bundle")
    if manifest_text is None:
        (copy / "manifest.json").unlink()
    else:
        (copy / "manifest.json").write_text(manifest_text)
    with pytest.raises(UntrustedFileError, match="manifest"):
        load_bundle(copy)


def test_precision_errors(fp32_bundle) -> None:
    _, folder, manifest = fp32_bundle
    assert manifest["precision"] == "fp32" and manifest["calibration"] == {}
    assert not any(name.endswith(".int8.onnx") for name in manifest["files"])
    with pytest.raises(ConfigError, match="no int8 files"):
        load_bundle(folder, precision="int8")
    with pytest.raises(ConfigError, match="precision"):
        load_bundle(folder, precision="int4")


def test_extra_manifest_cannot_override_reserved_keys(data, tmp_path: Path) -> None:
    moe = build_moe(build_model("resnet8", 3, NUM_CLASSES), 3, MoEConfig(num_experts=2, gate_size=4))
    with pytest.raises(ConfigError, match="files"):
        deploy_moe(moe, tmp_path, data[0][:8], int8=False, extra_manifest={"files": {}})


def test_measure_latency_of_bundle_and_single_model(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    images = data[0].numpy()
    bundle = load_bundle(folder, threads=2)
    result = measure_moe_latency(bundle, images, threads=2, batch=16, repeats=5, warmup=1)
    latency = result["latency"]
    assert latency["backend"] == "onnxruntime-int8 (CPUExecutionProvider)"
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


@pytest.mark.parametrize("views", [2, 8])
def test_bundle_with_test_time_views_matches_torch(views: int, data, tmp_path: Path) -> None:
    images, labels = data
    moe = _moe(2, images[:CALIBRATION], labels[:CALIBRATION])
    moe.views = views
    manifest = deploy_moe(moe, tmp_path, images[:CALIBRATION], int8=False)
    assert manifest["views"] == views
    bundle = load_bundle(tmp_path, precision="fp32")
    assert bundle.views == views and f"views={views}" in repr(bundle)
    counter = _CountingModel(bundle.gate)
    bundle.gate = counter
    output = bundle(images[:5].numpy())
    assert output.shape == (5, NUM_CLASSES) and counter.calls == [5 * views]  # one batch of all views
    result = agreement(moe, bundle, images)  # torch averages the same views in the same order
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0
    assert bundle(images[:0].numpy()).shape[0] == 0
    with pytest.raises(ConfigError, match="views"):
        OrtMoE(counter.model, bundle.experts, top_k=1, views=3)


def test_manifest_without_views_loads_as_one_view(fp32_bundle, tmp_path: Path) -> None:
    copy = shutil.copytree(fp32_bundle[1], tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest.pop("views") == 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_bundle(copy).views == 1  # bundles written before test-time views
    manifest["views"] = 5
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UntrustedFileError, match="views 5"):
        load_bundle(copy)
