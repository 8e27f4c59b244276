"""pipelines.deploy.bundle: writing a MoE as a bundle, and torch-vs-engine agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.deploy.bundle import agreement, deploy_moe
from pipelines.deploy.manifest import FORMAT_VERSION
from pipelines.deploy.runtime import OrtMoE, load_bundle
from pipelines.errors import ConfigError
from pipelines.models import build_model
from pipelines.moe import MoEConfig, build_moe
from pipelines.serialize import sha256_file
from tests.pipelines_tests.deploy_tests.support import CALIBRATION, NUM_CLASSES, _CountingModel, _moe


def test_manifest_records_files_calibration_and_extras(int8_bundle, data) -> None:
    moe, folder, manifest = int8_bundle
    written = json.loads((folder / "manifest.json").read_text())
    assert written == manifest.to_dict() and len(written["manifest_sha256"]) == 64
    assert manifest.format_version == FORMAT_VERSION and manifest.kind == "hycomp-moe"
    assert (manifest.top_k, manifest.num_experts) == (2, 3)
    assert manifest.input_shape == (3, 28, 28) and manifest.precision == "int8"
    assert manifest.metadata == {"trial": 7}
    expected_files = {"model.onnx", "gate.onnx", "gate.int8.onnx"} | {
        f"expert_{index}{suffix}" for index in range(3) for suffix in (".onnx", ".int8.onnx")
    }
    assert set(manifest.files) == expected_files and manifest.single_file == "model.onnx"
    for name, digest in manifest.files.items():
        assert sha256_file(folder / name) == digest
    # Each int8 expert saw the images routed to it, or all of them when fewer than 32 were.
    with torch.no_grad():
        _, chosen, _ = moe.route(data[0][:CALIBRATION])
    for expert_id in range(3):
        routed = int((chosen == expert_id).any(dim=1).sum())
        assert manifest.calibration[f"expert_{expert_id}.int8.onnx"] == (
            routed if routed >= 32 else CALIBRATION
        )
    assert manifest.calibration["gate.int8.onnx"] == CALIBRATION
    # The test MoE is not quantized by NNI: its fp32 weights are on no grid, so the engine rounds every int8
    # one (the stems on the 3-channel image stay fp32 and are not counted).
    assert set(manifest.weight_grid) == {name for name in expected_files if name.endswith(".int8.onnx")}
    for counts in manifest.weight_grid.values():
        assert counts["exact"] == 0 and counts["rounded"] >= 1


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


def test_extra_manifest_cannot_override_reserved_keys(data, tmp_path: Path) -> None:
    moe = build_moe(build_model("resnet8", 3, NUM_CLASSES), 3, MoEConfig(num_experts=2, gate_size=4))
    with pytest.raises(ConfigError, match="files"):
        deploy_moe(moe, tmp_path, data[0][:8], int8=False, extra_manifest={"files": {}})


@pytest.mark.parametrize("views", [2, 8])
def test_bundle_with_test_time_views_matches_torch(views: int, data, tmp_path: Path) -> None:
    images, labels = data
    moe = _moe(2, images[:CALIBRATION], labels[:CALIBRATION])
    moe.views = views
    manifest = deploy_moe(moe, tmp_path, images[:CALIBRATION], int8=False)
    assert manifest.views == views
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


def test_the_one_file_model_is_merged_again_from_the_bundles_own_files(
    int8_bundle, data, tmp_path: Path
) -> None:
    """An export re-merges model.onnx (a bundle deployed by an older version gets this version's routing graph)
    from the checked gate and expert files and reseals the manifest; a tampered expert is refused."""
    import shutil

    from pipelines.deploy.bundle import remerge_single_file
    from pipelines.deploy.manifest import read_manifest, verified
    from pipelines.deploy.runtime import load_single_file
    from pipelines.errors import UntrustedFileError

    _, folder, _ = int8_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    manifest = remerge_single_file(copy)
    assert verified(copy, manifest.single_file, read_manifest(copy)).stat().st_size > 1000
    images = data[0][CALIBRATION:].numpy()
    np.testing.assert_allclose(load_single_file(copy)(images), load_bundle(copy)(images), atol=1e-4)
    (copy / "expert_1.int8.onnx").write_bytes((copy / "expert_0.int8.onnx").read_bytes())
    with pytest.raises(UntrustedFileError, match="expert_1.int8.onnx was modified"):
        remerge_single_file(copy)
