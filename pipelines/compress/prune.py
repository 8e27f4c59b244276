"""Structured channel pruning: NNI pruner + ModelSpeedup, so pruned channels are physically removed."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipelines.compress._nni import PRUNER_CLASSES, prune_and_speedup
from pipelines.errors import CompressionError, ConfigError, unknown_name
from pipelines.measure import count_params

__all__ = ["PruneConfig", "PruneResult", "prune", "PRUNERS"]

PRUNERS: tuple[str, ...] = PRUNER_CLASSES


@dataclass(frozen=True)
class PruneConfig:
    """``sparsity``: fraction of each conv's output channels to remove (0 = no pruning)."""

    sparsity: float
    pruner: str = "l1"
    channel_multiple: int = 8  # keep multiples of this many channels per layer (1 = exact ratio)

    def __post_init__(self) -> None:
        if not 1 <= self.channel_multiple <= 64:
            raise ConfigError(
                f"prune.channel_multiple: {self.channel_multiple} is out of range; use 1 (off) to 64."
            )
        if self.pruner not in PRUNERS:
            raise unknown_name("prune.pruner", self.pruner, PRUNERS)
        if not 0.0 <= self.sparsity <= 0.95:
            raise ConfigError(f"prune.sparsity: {self.sparsity} is out of range; use a value in [0, 0.95].")


@dataclass
class PruneResult:
    model: nn.Module
    params_before: int
    params_after: int
    seconds: float

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of parameters removed (what the model really lost, not what was asked)."""
        return 1.0 - self.params_after / self.params_before


def prune(model: nn.Module, cfg: PruneConfig, example_input: torch.Tensor) -> PruneResult:
    """Return a pruned copy of ``model`` (the input is left untouched)."""
    started = time.perf_counter()
    pruned = copy.deepcopy(model).eval()
    before = count_params(pruned)
    if cfg.sparsity > 0:
        prune_and_speedup(pruned, cfg.pruner, cfg.sparsity, example_input, cfg.channel_multiple)
        after = count_params(pruned)
        if after >= before:
            raise CompressionError(
                f"pruning at sparsity {cfg.sparsity} with {cfg.pruner!r} removed nothing ({before} params kept)."
            )
        with torch.no_grad():
            output = pruned(example_input)
        if not torch.isfinite(output).all():
            raise CompressionError("the pruned model produces NaN/inf outputs.")
    return PruneResult(pruned, before, count_params(pruned), time.perf_counter() - started)
