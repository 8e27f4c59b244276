"""How much of a model's deployed latency each removable residual block takes: the model and each copy
without one block (:class:`~pipelines.compress.depth.RemovedBlock`) exported int8, and each copy timed in
rounds alternating with the whole model on the engine, at the batch it will serve.

Blocks of equal MACs cost unequal time: on a 28x28 ResNet-20 int8, a 16-channel block of the first stage
takes about three times the time of a 64-channel 7x7 one at batch 64 (results/benchmarks/block_choice.md),
so :func:`pipelines.compress.depth.remove_blocks` ranks blocks by output change per time saved with these
shares (``DepthConfig.ranking: latency``).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.compress.depth import RemovedBlock, removable_blocks
from pipelines.deploy.engines import open_model
from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.errors import ConfigError
from pipelines.timing import measure_interleaved

__all__ = ["block_time_shares"]


def block_time_shares(
    model: nn.Module,
    images: torch.Tensor,
    *,
    engine: str = "onnxruntime",
    threads: int = 1,
    batch: int = 1,
    rounds: int = 7,
    calls_per_round: int | None = None,
) -> dict[str, float]:
    """{block name: share of ``model``'s int8 latency saved by removing that block alone} for every removable
    block, on ``engine`` at ``batch`` (``images``: calibration images, repeated to fill the batch). A share is
    1 - the median over rounds of (model without the block / model); a share timed at or below zero is kept
    as a small positive floor (the block still costs a layer call). Empty for a model with no removable block.

    Example: ``block_time_shares(resnet20, train_images[:128], batch=64)["layers.0.1"]`` -> ``0.17``.
    """
    if batch < 1 or rounds < 1:
        raise ConfigError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}.")
    model = copy.deepcopy(model).eval()
    names = removable_blocks(model, images[:1])
    if not names:
        return {}
    calls = calls_per_round or (10 if batch == 1 else 2)
    inputs = np.ascontiguousarray(np.resize(images.numpy(), (batch, *images.shape[1:])), dtype=np.float32)
    calibration = images[:128]
    shares: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hycomp-blocks-") as scratch:
        folder = Path(scratch)
        whole = open_model(_int8(model, folder, "whole", calibration), engine, threads)
        for name in names:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            block = getattr(holder, child)
            setattr(holder, child, RemovedBlock())
            try:
                path = _int8(model, folder, name.replace(".", "_"), calibration)
            finally:
                setattr(holder, child, block)
            without = open_model(path, engine, threads)
            stats = measure_interleaved(
                lambda without=without: without(inputs),
                lambda: whole(inputs),
                rounds=rounds,
                calls_per_round=calls,
                warmup=2,
                backend=engine,
                threads=threads,
                batch=batch,
            )
            shares[name] = max(1.0 - stats.ratio_round_median, MIN_SHARE)
    return shares


# the floor of a share: a removed block always saves at least its calls, and the ranking divides by it
MIN_SHARE = 0.005


def _int8(model: nn.Module, folder: Path, name: str, calibration: torch.Tensor) -> Path:
    fp32 = export_onnx(model, calibration[:2], folder / f"{name}.onnx")
    return quantize_onnx_int8(fp32, folder / f"{name}.int8.onnx", calibration.numpy())
