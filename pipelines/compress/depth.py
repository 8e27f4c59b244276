"""Depth reduction: whole residual blocks with an identity shortcut are removed (replaced by
:class:`RemovedBlock`, a no-op), so the model is physically shallower: fewer layers run, are counted and
are exported.

At 28x28 a call of a small ResNet is dominated by per-layer overhead, so fewer layers can buy latency
that thinner layers cannot. Removable: a block whose output has its input's shape and adds a residual
branch to an identity shortcut (our ResNets' non-first blocks of each stage, torchvision BasicBlock /
Bottleneck without ``downsample``, MobileNetV2 InvertedResidual with ``use_res_connect``).

Which blocks: greedily, the block whose bypass changes the model's output least (KL divergence of the
softmax outputs from the unreduced model's, on a fixed sample of unlabelled images). It needs no labels,
measures what distillation then has to recover, and costs one forward pass per candidate and step. With
``ranking: latency`` the change is divided by the block's share of the deployed latency
(:mod:`pipelines.deploy.block_time`): blocks of equal MACs cost unequal time, and a slow block whose
removal changes the output a little more than a fast one's is the better trade.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import CompressionError, ConfigError, unknown_name
from pipelines.measure import count_macs, forward_with_hooks
from pipelines.models import BasicBlock

__all__ = ["RANKINGS", "DepthConfig", "DepthResult", "RemovedBlock", "removable_blocks", "remove_blocks"]

RANKINGS = ("output", "latency")  # DepthConfig.ranking


class RemovedBlock(nn.Identity):
    """The place of a removed residual block: passes its input through. Its own type (not a model's own
    ``nn.Identity``) lets a checkpoint record and rebuild exactly the removed blocks."""


@dataclass(frozen=True)
class DepthConfig:
    """``blocks_removed``: how many removable blocks to remove, as a count (int >= 0) or a fraction of
    them (float in [0, 1]). ``scoring_images``: how many images (a fixed sample) rank the blocks.
    ``ranking``: ``output`` (least output change first) or ``latency`` (least output change per share of
    latency saved, the shares in ``block_time``: (block name, share) pairs, measured on the deployed engine
    by :func:`pipelines.deploy.block_time.block_time_shares`)."""

    blocks_removed: int | float = 0
    scoring_images: int = 64
    ranking: str = "output"
    block_time: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        value = self.blocks_removed
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"depth.blocks_removed: {value!r} is not a number; use a count (e.g. 2) or a fraction (e.g. 0.5)."
            )
        if isinstance(value, int) and value < 0:
            raise ConfigError(f"depth.blocks_removed: {value} must be >= 0 (a number of blocks).")
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"depth.blocks_removed: {value} is a fraction out of range; use a fraction in [0, 1] or an "
                "integer count of blocks."
            )
        if not 1 <= self.scoring_images <= 100_000:
            raise ConfigError(
                f"depth.scoring_images: {self.scoring_images} is out of range; use 1 to 100000."
            )
        if self.ranking not in RANKINGS:
            raise unknown_name("depth.ranking", self.ranking, RANKINGS)
        for name, share in self.block_time:
            if not 0.0 < share <= 1.0:
                raise ConfigError(
                    f"depth.block_time: {name} has share {share}; a block's share of latency is in (0, 1]."
                )

    @property
    def active(self) -> bool:
        """Whether this configuration removes anything (0 and 0.0 do not)."""
        return self.blocks_removed != 0

    def count(self, removable: int) -> int:
        """The number of blocks to remove from a model with ``removable`` removable blocks."""
        if isinstance(self.blocks_removed, float):
            return int(round(self.blocks_removed * removable))
        return self.blocks_removed


@dataclass
class DepthResult:
    model: nn.Module
    removed: tuple[str, ...]  # qualified names of the removed blocks, in the order they were removed
    candidates: tuple[str, ...]  # every removable block of the input model
    scores: dict[str, float]  # per removed block: output KL divergence when it was removed
    macs_before: int
    macs_after: int
    seconds: float


def _has_identity_shortcut(module: nn.Module) -> bool:
    """Whether ``module`` is a known residual block whose shortcut is the identity."""
    if isinstance(module, BasicBlock):
        return isinstance(module.shortcut, nn.Sequential) and len(module.shortcut) == 0
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.models.resnet import BasicBlock as TorchvisionBasic
        from torchvision.models.resnet import Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    if isinstance(module, TorchvisionBasic | Bottleneck):
        return module.downsample is None
    if isinstance(module, InvertedResidual):
        return bool(module.use_res_connect)
    return False


def removable_blocks(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Qualified names of the blocks of ``model`` that :func:`remove_blocks` may remove: a known residual
    block with an identity shortcut whose output shape equals its input shape on ``example_input``."""
    names = [name for name, module in model.named_modules() if name and _has_identity_shortcut(module)]
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(
                name, (inputs[0].shape, output.shape)
            )
        )
        for name in names
    ]
    forward_with_hooks(model, example_input, handles)
    return [name for name in names if name in shapes and shapes[name][0] == shapes[name][1]]


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    previous = getattr(parent, child)
    setattr(parent, child, module)
    return previous


def _scoring_sample(images: torch.Tensor, count: int) -> torch.Tensor:
    """A fixed (seeded) sample of ``count`` images: the same images give the same blocks, wherever called."""
    if len(images) <= count:
        return images
    generator = torch.Generator().manual_seed(0)
    return images[torch.randperm(len(images), generator=generator)[:count]]


def _costs(cfg: DepthConfig, candidates: list[str]) -> dict[str, float]:
    """What a block's output change is divided by: 1 for ``output``, its latency share for ``latency``."""
    if cfg.ranking == "output":
        return dict.fromkeys(candidates, 1.0)
    shares = dict(cfg.block_time)
    missing = [name for name in candidates if name not in shares]
    if missing:
        raise ConfigError(
            f"depth.ranking: 'latency' needs each removable block's share of latency, but depth.block_time has "
            f"none for {', '.join(missing)}. Measure them with pipelines.deploy.block_time.block_time_shares "
            "on this model, or use ranking 'output'."
        )
    return shares


def remove_blocks(
    model: nn.Module, cfg: DepthConfig, images: torch.Tensor, example_input: torch.Tensor | None = None
) -> DepthResult:
    """Return a shallower copy of ``model`` (the input is left untouched) with ``cfg.blocks_removed``
    residual blocks replaced by :class:`RemovedBlock`, chosen greedily on a sample of ``images``
    (unlabelled; training images). MACs are counted per input on ``example_input`` (default: one image).

    Example: ``remove_blocks(resnet20, DepthConfig(blocks_removed=2), train_images).removed``
    -> ``('layers.0.2', 'layers.1.2')``.
    """
    started = time.perf_counter()
    shallow = copy.deepcopy(model).eval()
    example = images[:1] if example_input is None else example_input
    candidates = removable_blocks(shallow, example)
    macs_before = count_macs(shallow, example)
    wanted = cfg.count(len(candidates))
    if wanted > 0 and not candidates:
        raise CompressionError(
            f"depth.blocks_removed: {cfg.blocks_removed} asks to remove residual blocks, but "
            f"{type(model).__name__} has none that can go (a block needs an identity shortcut and equal "
            "input and output shapes). Set blocks_removed to 0 for this model."
        )
    if wanted > len(candidates):
        raise CompressionError(
            f"depth.blocks_removed: {cfg.blocks_removed} is more than the {len(candidates)} removable blocks "
            f"of {type(model).__name__} ({', '.join(candidates)}). Use at most {len(candidates)}."
        )
    removed: list[str] = []
    scores: dict[str, float] = {}
    cost = _costs(cfg, candidates) if wanted > 0 else {}
    if wanted > 0:
        sample = _scoring_sample(images, cfg.scoring_images)
        with torch.no_grad():
            reference = F.log_softmax(shallow(sample).float(), dim=1)
            remaining = list(candidates)
            for _ in range(wanted):
                divergence = {}
                for name in remaining:
                    original = _replace(shallow, name, RemovedBlock())
                    output = F.log_softmax(shallow(sample).float(), dim=1)
                    _replace(shallow, name, original)
                    divergence[name] = float(
                        F.kl_div(output, reference, log_target=True, reduction="batchmean")
                    )
                # the least harmful block (per time saved); ties (e.g. zero-initialised branches) go to the
                # earliest one
                chosen = min(
                    remaining, key=lambda name: (divergence[name] / cost[name], remaining.index(name))
                )
                _replace(shallow, chosen, RemovedBlock())
                remaining.remove(chosen)
                removed.append(chosen)
                scores[chosen] = divergence[chosen]
            output = shallow(example)
        if not torch.isfinite(output).all():
            raise CompressionError("the model without its removed blocks produces NaN/inf outputs.")
    return DepthResult(
        model=shallow,
        removed=tuple(removed),
        candidates=tuple(candidates),
        scores=scores,
        macs_before=macs_before,
        macs_after=count_macs(shallow, example),
        seconds=time.perf_counter() - started,
    )
