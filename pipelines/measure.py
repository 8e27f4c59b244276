"""Measurements on the physically compressed model: MACs, parameters and packed size.

Conventions (written into every report):
- MACs: multiply-accumulates of convolutions (any groups: depthwise and grouped convs count
  ``in_channels / groups`` inputs per output) and Linear layers for ONE input, counted on the modules as
  they are (after ModelSpeedup, so pruned channels are really gone). FLOPs = 2 x MACs. BatchNorm,
  activations, pooling, residual adds and squeeze-excite multiplies are not counted (folded or
  elementwise; the convs and Linears of a squeeze-excite block are).
- Packed size: conv/linear weights at their bit-width, plus one fp32 scale and one fp32 bias per output
  channel (BatchNorm folds into them). Sub-byte weights are counted packed (e.g. two 4-bit weights per
  byte), even though the int8 engine executes them as int8.
- Latency: :func:`pipelines.timing.measure_latency` is the one harness; :func:`torch_runner` gives it a
  torch model to time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "forward_with_hooks",
    "count_macs",
    "count_params",
    "packed_size_bytes",
    "torch_runner",
]


def forward_with_hooks(model: nn.Module, example_input: torch.Tensor, handles: list) -> None:
    """One eval-mode, no-grad forward pass of ``model`` for the forward hooks in ``handles``, which are removed
    afterwards; the model's training mode is restored, so counting never moves BatchNorm statistics."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of convolution and Linear layers per input, measured by running ``model`` on ``example_input``.

    Only layers that actually execute are counted, so for a Mixture-of-Experts the result is gate +
    the experts the routing chose, averaged over the batch.
    """
    total = 0

    def conv_hook(module: nn.modules.conv._ConvNd, inputs, output) -> None:
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def transposed_hook(module: nn.modules.conv._ConvTransposeNd, inputs, output) -> None:
        nonlocal total  # each input element is spread over out_channels / groups x kernel outputs
        kernel = math.prod(module.kernel_size)
        total += inputs[0].numel() * (module.out_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, inputs, output) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            handles.append(module.register_forward_hook(transposed_hook))
        elif isinstance(module, nn.modules.conv._ConvNd):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    forward_with_hooks(model, example_input, handles)
    return int(round(total / example_input.shape[0]))


def count_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def packed_size_bytes(
    model: nn.Module, weight_bits: int | Callable[[str], int] = 32, skip: tuple[str, ...] = ()
) -> int:
    """Deployed size in bytes (see the module docstring for the convention).

    ``weight_bits`` is one bit-width for every layer or a function of the layer's qualified name;
    layers whose name starts with a prefix in ``skip`` (parts that never run) are not counted.
    """
    bits_of = weight_bits if callable(weight_bits) else (lambda _name: weight_bits)
    total_bits = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear) and not name.startswith(skip):
            bits = bits_of(name)
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            out_channels = module.out_channels if transposed else module.weight.shape[0]
            total_bits += module.weight.numel() * bits
            total_bits += out_channels * 32  # bias (own or folded from BatchNorm)
            if bits < 32:
                total_bits += out_channels * 32  # per-channel scale
    return int(math.ceil(total_bits / 8))


def torch_runner(model: nn.Module, example_input: torch.Tensor, threads: int) -> Callable[[], object]:
    """A no-grad eager call of ``model`` with torch's intra-op threads fixed to ``threads``."""
    model.eval()

    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return model(example_input)
        finally:
            torch.set_num_threads(previous)

    return run
