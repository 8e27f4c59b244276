"""Measurements on the physically compressed model: MACs, parameters, packed size and latency.

Conventions (written into every report):
- MACs: multiply-accumulates of convolutions (any groups: depthwise and grouped convs count
  ``in_channels / groups`` inputs per output) and Linear layers for ONE input, counted on the modules as
  they are (after ModelSpeedup, so pruned channels are really gone). FLOPs = 2 x MACs. BatchNorm,
  activations, pooling, residual adds and squeeze-excite multiplies are not counted (folded or
  elementwise; the convs and Linears of a squeeze-excite block are).
- Packed size: conv/linear weights at their bit-width, plus one fp32 scale and one fp32 bias per output
  channel (BatchNorm folds into them). Sub-byte weights are counted packed (e.g. two 4-bit weights per
  byte), even though the int8 engine executes them as int8.
- Latency: :func:`measure_latency` is the one harness: warm-up, repeated timed calls, median and
  spread, with the backend, threads and batch recorded beside the number.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "count_macs",
    "count_params",
    "packed_size_bytes",
    "LatencyStats",
    "measure_latency",
    "torch_runner",
]


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
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
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


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch: int
    backend: str
    versions: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"{self.backend}, {self.threads} thread(s), batch {self.batch}"


# Instruction sets that change int8 speed: VNNI (AVX512 or AVX) multiplies uint8 x int8 without the
# 16-bit saturation of AVX2's VPMADDUBSW; timings from CPUs with and without them do not compare.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "sve")


@functools.cache
def cpu_description() -> str:
    """e.g. ``AMD EPYC (x86_64; avx2 avx512f avx512_vnni), 2 logical cores``: what latencies ran on."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform module's name is all there is
        pass
    features = " ".join(feature for feature in _CPU_FEATURES if feature in flags)
    name = model or platform.processor() or platform.machine()
    return (
        f"{name} ({platform.machine()}{'; ' + features if features else ''}), {os.cpu_count()} logical cores"
    )


def _versions() -> dict:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_description(),
    }
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass
    return versions


def measure_latency(
    run: Callable[[], object],
    *,
    backend: str,
    threads: int,
    batch: int,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 0.0,
) -> LatencyStats:
    """Time ``run()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (and at least
    ``min_seconds`` of timing); returns the median and the 10th/90th percentiles in milliseconds.

    The caller fixes the thread count of its backend (``torch_runner`` does for torch; ONNX Runtime
    sessions take it in their options) and passes it here so it is recorded.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        run()
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        tick = time.perf_counter()
        run()
        samples.append((time.perf_counter() - tick) * 1000.0)
    samples.sort()

    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return LatencyStats(
        median_ms=statistics.median(samples),
        p10_ms=quantile(0.1),
        p90_ms=quantile(0.9),
        repeats=len(samples),
        warmup=warmup,
        threads=threads,
        batch=batch,
        backend=backend,
        versions=_versions(),
    )


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
