"""Writes a Mixture-of-Experts as a deployable bundle (ONNX gate + experts, their int8 twins, a sealed
manifest) and checks how closely the engine reproduces the torch model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.deploy.int8 import quantize_with_grid
from pipelines.deploy.manifest import (
    SINGLE_FILE,
    Manifest,
    file_names,
    read_manifest,
    trunk_file_name,
    verified,
)
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel, OrtMoE
from pipelines.deploy.single_file import merge_moe_onnx
from pipelines.errors import ConfigError, DataError
from pipelines.files import sha256_file
from pipelines.moe import MixtureOfExperts, SharedTrunkMoE

__all__ = ["MIN_EXPERT_CALIBRATION", "agreement", "deploy_moe", "remerge_single_file"]

# An expert calibrated on fewer routed images than this gets all calibration images instead: a handful
# of samples gives activation ranges that clip the inputs it will meet later.
MIN_EXPERT_CALIBRATION = 32
_DESCRIBED = ("dataset", "class_names", "mean", "std", "params")  # extra_manifest keys with typed fields
_RESERVED = {
    "format_version",
    "kind",
    "top_k",
    "num_experts",
    "input_shape",
    "files",
    "precision",
    "single_file",
    "calibration",
    "weight_grid",
    "views",
    "layout",
    "metadata",
    "manifest_sha256",
}


def deploy_moe(
    moe: MixtureOfExperts,
    folder: Path,
    calibration_images: torch.Tensor,
    *,
    int8: bool = True,
    extra_manifest: dict | None = None,
) -> Manifest:
    """Write ``moe`` as a bundle: ``model.onnx`` (the whole MoE as one file, at the bundle's precision, see
    :mod:`~pipelines.deploy.single_file`), the files it is merged from (``gate.onnx``, ``expert_<i>.onnx``
    and, with ``int8``, their ``*.int8.onnx`` twins), plus ``manifest.json`` (:class:`~pipelines.deploy.manifest.Manifest`); ``extra_manifest`` may
    give dataset, class_names, mean, std and params, and other JSON values kept as metadata. Returns the
    manifest.

    The int8 gate is calibrated on all ``calibration_images``; each int8 expert on the images the torch
    gate routes to it (any of its top-k slots), or on all of them when fewer than
    ``MIN_EXPERT_CALIBRATION`` are routed there.

    A shared-trunk MoE (:class:`~pipelines.moe.SharedTrunkMoE`) adds ``trunk.onnx`` (and its int8 twin,
    calibrated on the images); its gate and experts take the trunk's feature map as input and are
    calibrated on the features of the same images.
    """
    folder = Path(folder)
    extra_manifest = dict(extra_manifest or {})
    clashes = sorted(_RESERVED & extra_manifest.keys())
    if clashes:
        raise ConfigError(f"extra_manifest: keys {clashes} are written by deploy_moe; rename them.")
    described = {key: extra_manifest.pop(key) for key in _DESCRIBED if key in extra_manifest}
    if (
        not isinstance(calibration_images, torch.Tensor)
        or calibration_images.ndim != 4
        or len(calibration_images) == 0
    ):
        raise DataError("calibration_images: expected a non-empty (N, C, H, W) tensor.")
    calibration_images = calibration_images.detach().cpu().float()
    folder.mkdir(parents=True, exist_ok=True)
    was_training = moe.training
    moe.eval()
    shared = isinstance(moe, SharedTrunkMoE)
    try:
        written: list[str] = []
        calibration: dict[str, int] = {}
        weight_grid: dict[str, dict[str, int]] = {}
        if shared:
            trunk_name = trunk_file_name("fp32")
            export_onnx(moe.trunk, calibration_images[:2], folder / trunk_name)
            written.append(trunk_name)
            if int8:
                int8_trunk = trunk_file_name("int8")
                grid = quantize_with_grid(
                    folder / trunk_name, folder / int8_trunk, calibration_images, "first"
                )
                weight_grid[int8_trunk] = {key: len(names) for key, names in grid.items()}
                calibration[int8_trunk] = len(calibration_images)
                written.append(int8_trunk)
        with torch.no_grad():
            inputs = moe.expert_input(calibration_images)  # what the gate and the experts read
        example = inputs[:2]
        fp32_gate, fp32_experts = file_names(moe.num_experts, "fp32")
        export_onnx(moe.gate, example, folder / fp32_gate)
        for expert, name in zip(moe.experts, fp32_experts, strict=True):
            export_onnx(expert, example, folder / name)
        written += [fp32_gate, *fp32_experts]
        if int8:
            int8_gate, int8_experts = file_names(moe.num_experts, "int8")
            # The gate is a few percent of the MoE's MACs: all its 8-bit weights are held exactly.
            grid = quantize_with_grid(folder / fp32_gate, folder / int8_gate, inputs, "all")
            weight_grid[int8_gate] = {key: len(names) for key, names in grid.items()}
            calibration[int8_gate] = len(inputs)
            with torch.no_grad():
                _, chosen, _ = moe.route(calibration_images)
            for expert_id, (fp32_name, int8_name) in enumerate(zip(fp32_experts, int8_experts, strict=True)):
                routed = inputs[(chosen == expert_id).any(dim=1)]
                images = routed if len(routed) >= MIN_EXPERT_CALIBRATION else inputs
                grid = quantize_with_grid(folder / fp32_name, folder / int8_name, images, "first")
                weight_grid[int8_name] = {key: len(names) for key, names in grid.items()}
                calibration[int8_name] = len(images)
            written += [int8_gate, *int8_experts]
        # The deployed artifact: one file at the bundle's precision, merged from the (quantized) files above;
        # those stay beside it for debugging and per-expert timing.
        gate_name, expert_names = file_names(moe.num_experts, "int8" if int8 else "fp32")
        merge_moe_onnx(
            folder / gate_name if moe.num_experts > 1 else None,
            [folder / name for name in expert_names],
            moe.top_k,
            moe.views,
            folder / SINGLE_FILE,
            trunk_path=folder / trunk_file_name("int8" if int8 else "fp32") if shared else None,
        )
        written.append(SINGLE_FILE)
    finally:
        moe.train(was_training)
    manifest = Manifest(
        top_k=moe.top_k,
        num_experts=moe.num_experts,
        views=moe.views,
        layout="shared" if shared else "separate",
        input_shape=tuple(calibration_images.shape[1:]),
        files={name: sha256_file(folder / name) for name in written},
        precision="int8" if int8 else "fp32",
        single_file=SINGLE_FILE,
        calibration=calibration,
        weight_grid=weight_grid,
        dataset=described.get("dataset"),
        class_names=tuple(described["class_names"]) if described.get("class_names") else None,
        mean=tuple(described["mean"]) if described.get("mean") else None,
        std=tuple(described["std"]) if described.get("std") else None,
        params=described.get("params", {}),
        metadata=extra_manifest,
    )
    manifest.write(folder)
    return manifest


def remerge_single_file(folder: Path) -> Manifest:
    """Write the bundle's ``model.onnx`` again from its own (checked) gate, expert and trunk files with this
    hycomp's :func:`~pipelines.deploy.single_file.merge_moe_onnx`, and reseal the manifest: an export of a model
    deployed by an earlier version carries the current routing graph. Returns the new manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    gate_name, expert_names = file_names(manifest.num_experts, manifest.precision)
    experts = [verified(folder, name, manifest) for name in expert_names]
    gate = verified(folder, gate_name, manifest) if manifest.num_experts > 1 else None
    trunk = (
        verified(folder, trunk_file_name(manifest.precision), manifest)
        if manifest.layout == "shared"
        else None
    )
    merge_moe_onnx(
        gate, experts, manifest.top_k, manifest.views, folder / manifest.single_file, trunk_path=trunk
    )
    files = {**manifest.files, manifest.single_file: sha256_file(folder / manifest.single_file)}
    updated = dataclasses.replace(manifest, files=files)
    updated.write(folder)
    return updated


def agreement(
    torch_model: nn.Module, ort_model: OrtModel | OrtMoE, images: torch.Tensor, batch_size: int = 256
) -> dict:
    """How closely ``ort_model`` reproduces ``torch_model`` (eval mode) on ``images``:
    ``{"max_abs_diff": largest logit difference, "top1_agreement": fraction of equal argmax}``."""
    images = torch.as_tensor(images).detach().cpu().float()
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"images: expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
    was_training = torch_model.training
    torch_model.eval()
    max_abs_diff, agreeing = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                expected = torch_model(chunk).numpy()
                actual = ort_model(chunk.numpy())
                max_abs_diff = max(max_abs_diff, float(np.abs(expected - actual).max()))
                agreeing += int((expected.argmax(axis=1) == actual.argmax(axis=1)).sum())
    finally:
        torch_model.train(was_training)
    return {"max_abs_diff": max_abs_diff, "top1_agreement": agreeing / len(images)}
