"""Shared helpers of the deploy tests: tiny untrained-but-fitted models (BatchNorm statistics from the images, a
ridge-regression classifier on pooled features) whose logits are correct and well separated, so a routing
mistake in the engine shows up as a logit difference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.deploy.runtime import OrtModel
from pipelines.models import build_model
from pipelines.moe import MixtureOfExperts, MoEConfig, SharedTrunkMoE, build_moe

NUM_CLASSES = 8


CALIBRATION = 64  # the first 64 images calibrate and fit; the other 64 are held out


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
        elif node.op_type == "Conv" and arrays.get(node.input[1]) is not None:  # kept in fp32 (float_layers)
            engine.append(arrays[node.input[1]].astype(np.float64))
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


class _CountingModel:
    """Wraps an OrtModel and records the batch size of every call."""

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        return self.model(images)


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
