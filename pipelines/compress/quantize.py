"""Weight quantization: NNI QAT at the sampled bit-width, then "bake" the learned fake-quantization into
the fp32 weights so a plain module (and ONNX / an int8 engine) carries exactly the quantized values.

NNI only simulates low precision: a baked model is fp32 whose weights lie on the int-b grid. Its size is
counted packed (see ``measure.packed_size_bytes``); speed comes from the int8 engine in ``deploy``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.compress._nni import QUANTIZER_METHODS, quantize_weights
from pipelines.data import Split
from pipelines.errors import ConfigError, unknown_name
from pipelines.train import TrainConfig, make_step, train

__all__ = ["QuantizeConfig", "QuantizeResult", "quantize", "BITS", "QUANTIZER_METHODS"]

BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 32)


@dataclass(frozen=True)
class QuantizeConfig:
    """``bits``: weight bit-width of the searched layers (32 = keep fp32). ``first_last_bits``: the
    first conv and the classifier, which are most sensitive, stay at this width (8 by convention)."""

    bits: int = 8
    first_last_bits: int = 8
    method: str = "qat"  # qat: quantization-aware training | ptq: post-training (min/max, no training)

    def __post_init__(self) -> None:
        if self.method not in QUANTIZER_METHODS:
            raise unknown_name("quantize.method", self.method, QUANTIZER_METHODS)
        for name in ("bits", "first_last_bits"):
            if getattr(self, name) not in BITS:
                raise ConfigError(
                    f"quantize.{name}: {getattr(self, name)} is not supported; use one of {', '.join(map(str, BITS))}."
                )


@dataclass
class QuantizeResult:
    model: nn.Module
    bits_by_layer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def bits_of(self, layer_name: str) -> int:
        return self.bits_by_layer.get(layer_name, 32)


def _weight_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)]


def _bake(model: nn.Module, calibration: dict[str, dict]) -> None:
    """Write the fake-quantized weights into the fp32 weights (symmetric, per output channel)."""
    with torch.no_grad():
        for name, entry in calibration.items():
            weight = model.get_submodule(name).weight
            scale = entry["scale"].to(weight.dtype).reshape(-1, *([1] * (weight.dim() - 1)))
            zero_point = entry["zero_point"].to(weight.dtype).reshape_as(scale)
            levels = torch.clamp(torch.round(weight / scale) + zero_point, entry["qmin"], entry["qmax"])
            weight.copy_((levels - zero_point) * scale)


def quantize(
    model: nn.Module,
    cfg: QuantizeConfig,
    data: Split,
    train_cfg: TrainConfig,
    teacher: nn.Module | None,
    example_input: torch.Tensor,
    skip_layers: tuple[str, ...] = (),
) -> QuantizeResult:
    """QAT ``model`` in place (weights of Conv2d/Linear, per output channel) and bake the result.

    ``skip_layers`` (name prefixes) are left out; the first and last weight layer of each top-level
    part get ``first_last_bits``.
    """
    started = time.perf_counter()
    if cfg.bits >= 32:
        return QuantizeResult(model, {}, time.perf_counter() - started)
    layers = [name for name in _weight_layers(model) if not name.startswith(skip_layers)]
    targets = {name: cfg.bits for name in layers}
    # The first/last layer of each expert and the whole (tiny) gate are the most sensitive: they keep
    # ``first_last_bits`` (8) when the searched width is lower.
    for name in layers:
        if name.startswith("gate.") or name in _edge_layers(model, layers):
            targets[name] = max(cfg.bits, cfg.first_last_bits)

    def train_function(module: nn.Module, optimizer: torch.optim.Optimizer, step) -> None:
        _prime(module, example_input)
        if cfg.method == "ptq":
            return  # weight ranges need no data: priming ran every layer once
        train(module, data, train_cfg, teacher, optimizer=optimizer, step=step)

    calibration = quantize_weights(
        model,
        cfg.bits,
        targets,
        train_function,
        make_step(teacher, train_cfg),
        train_cfg.lr,
        example_input,
        method=cfg.method,
    )
    _bake(model, calibration)
    model.eval()
    return QuantizeResult(model, targets, time.perf_counter() - started)


def _prime(model: nn.Module, example_input: torch.Tensor) -> None:
    """Run every expert once so NNI tracks the weight range of each wrapped layer.

    NNI learns a layer's scale only in a training-mode forward through it; with top-k routing an expert
    may receive no sample in a short QAT run and would keep no scale at all. BatchNorm stays in eval mode
    here so its running statistics are not touched.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    with torch.no_grad():
        # the experts of a shared-trunk MoE read the trunk's features, not the image
        expert_input = model.expert_input(example_input) if hasattr(model, "expert_input") else example_input
        for expert in getattr(model, "experts", []):
            expert(expert_input)
        model(example_input)
    model.train()


def _edge_layers(model: nn.Module, layers: list[str]) -> set[str]:
    """First and last weight layer of every expert / the model itself (``experts.3.conv1``…). With a
    shared trunk the network's first layer is the trunk's and each expert's last layer is a classifier:
    the trunk's last and the experts' first layers are inner layers and keep the searched width."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        key = (
            ".".join(parts[:2])
            if parts[0] == "experts"
            else parts[0]
            if parts[0] in ("gate", "trunk")
            else ""
        )
        groups.setdefault(key, []).append(name)
    shared = "trunk" in groups
    edges: set[str] = set()
    for key, names in groups.items():
        if shared and key == "trunk":
            edges.add(names[0])
        elif shared and key.startswith("experts."):
            edges.add(names[-1])
        else:
            edges.update({names[0], names[-1]})
    return edges
