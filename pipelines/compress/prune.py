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

__all__ = ["PruneConfig", "PruneResult", "prune", "PRUNERS", "check_exclude"]

PRUNERS: tuple[str, ...] = PRUNER_CLASSES


@dataclass(frozen=True)
class PruneConfig:
    """``sparsity``: fraction of each conv's output channels to remove (0 = no pruning)."""

    sparsity: float
    pruner: str = "l1"
    channel_multiple: int = 8  # keep multiples of this many channels per layer (1 = exact ratio)
    exclude: tuple[str, ...] = ()  # module names left unpruned (``model.exclude``, ModelSpec.exclude)

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str) or not all(isinstance(name, str) and name for name in self.exclude):
            raise ConfigError(f"model.exclude: {self.exclude!r} is not a list of module names.")
        object.__setattr__(self, "exclude", tuple(self.exclude))
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
    check_exclude(model, cfg.exclude)
    pruned = copy.deepcopy(model).eval()
    before = count_params(pruned)
    if cfg.sparsity > 0:
        prune_and_speedup(pruned, cfg.pruner, cfg.sparsity, example_input, cfg.channel_multiple, cfg.exclude)
        # ModelSpeedup's new layers start in train mode: a forward (the check below, a caller's evaluation)
        # would move the BatchNorm statistics they copied from the teacher
        pruned.eval()
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


def check_exclude(model: nn.Module, exclude: tuple[str, ...]) -> None:
    """A ConfigError for a ``model.exclude`` name that matches no module of ``model`` (NNI would ignore it)."""
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    for name in exclude:
        if name not in known:
            convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
            raise ConfigError(
                f"model.exclude: {name!r} names no module of the model. Use qualified module names as "
                f"model.named_modules() gives them, e.g. {', '.join(repr(conv) for conv in convs[:3])}."
            )
