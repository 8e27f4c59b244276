"""A network as stem, stages and head, so a shared-trunk Mixture-of-Experts can run the first stages once
and give each expert the rest (:class:`pipelines.moe.SharedTrunkMoE`).

Recognized: the registry ResNets (:class:`pipelines.models.ResNet`: ``conv1 bn1 relu``, ``layers[i]``,
``pool fc``) and torchvision ResNets (``conv1 bn1 relu maxpool``, ``layer1..layer4``, ``avgpool fc``).
Other models have no stage list this module can read: :func:`split_model` says so with a ConfigError.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pipelines.errors import ConfigError
from pipelines.models import ResNet

__all__ = ["num_stages", "split_model", "output_channels"]

_TORCHVISION_STEM = ("conv1", "bn1", "relu", "maxpool")
_TORCHVISION_STAGES = ("layer1", "layer2", "layer3", "layer4")

Named = list[tuple[str, nn.Module]]


def _parts(model: nn.Module) -> tuple[Named, Named, Named]:
    """(stem, stages, head) as named modules (the model's own objects, not copies)."""
    if isinstance(model, ResNet):
        stem = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu)]
        stages = [(f"stage{index + 1}", stage) for index, stage in enumerate(model.layers)]
        return stem, stages, [("pool", model.pool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]
    names = (*_TORCHVISION_STEM, *_TORCHVISION_STAGES, "avgpool", "fc")
    if all(isinstance(getattr(model, name, None), nn.Module) for name in names):
        stem = [(name, getattr(model, name)) for name in _TORCHVISION_STEM]
        stages = [(name, getattr(model, name)) for name in _TORCHVISION_STAGES]
        return stem, stages, [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]
    raise ConfigError(
        f"moe.layout: 'shared' splits the model into a trunk and experts at a stage, but "
        f"{type(model).__name__} has no stage list hycomp recognizes (registry ResNets and torchvision "
        "ResNets have). Use moe.layout: separate for this model."
    )


def num_stages(model: nn.Module) -> int:
    """How many stages ``model`` has (3 for resnet8 / resnet20, 4 for resnet18 and torchvision ResNets)."""
    return len(_parts(model)[1])


def split_model(model: nn.Module, split_at: int) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, tail): trunk = stem + stages ``[0, split_at)``; tail = the other stages + pooling + classifier.
    ``tail(trunk(x))`` equals ``model(x)``. Both share ``model``'s modules; deep-copy first to keep it."""
    stem, stages, head = _parts(model)
    if not isinstance(split_at, int) or not 1 <= split_at <= len(stages) - 1:
        raise ConfigError(
            f"moe.split_at: {split_at!r} is out of range for {type(model).__name__} with {len(stages)} stages "
            f"({', '.join(name for name, _ in stages)}); use 1..{len(stages) - 1} (the first stage the experts own)."
        )
    trunk = nn.Sequential(OrderedDict(stem + stages[:split_at]))
    tail = nn.Sequential(OrderedDict(stages[split_at:] + head))
    return trunk, tail


def output_channels(trunk: nn.Module) -> int:
    """Channels of the trunk's feature map: the last BatchNorm's features (a residual block ends on one;
    its shortcut's BatchNorm has the same count), else the last convolution's output channels."""
    norms = [module.num_features for module in trunk.modules() if isinstance(module, nn.BatchNorm2d)]
    if norms:
        return norms[-1]
    convolutions = [module.out_channels for module in trunk.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise ConfigError("moe.split_at: the trunk has no convolution; split at a later stage.")
    return convolutions[-1]
