"""Models: what to compress, given as a :class:`ModelSpec`, and the registry of built-in ResNets.

``ModelSpec.arch`` names one of three sources, each adapted to the dataset's channels and classes:

- a registry name (``MODELS``, a plain dict: name -> builder(in_channels, num_classes, width));
- ``torchvision:<builder>`` (``TORCHVISION_BUILDERS``), untrained; ``small_input`` swaps the stem for
  small images the way CIFAR variants do, so a 28x28 input is not pooled away before the first block;
- ``module.path:callable`` for the user's own code, imported from the working directory or installed.

A spec round-trips through JSON (``to_dict`` / ``from_dict``): checkpoints of compressed models record it
and rebuild the architecture from it before resizing the pruned layers.

Registry models:

- ``resnet18``: ResNet-18 with a CIFAR-style stem (3x3 conv, stride 1, no max-pool) suited to 28x28 /
  32x32 inputs (11.2 M params).
- ``resnet20`` / ``resnet8``: He et al.'s CIFAR ResNets (16-32-64 channels), 0.27 M / 0.08 M params.

Each residual block owns its ReLU modules (no module reuse), so the graph traces cleanly with torch.fx
for NNI's ModelSpeedup and exports to ONNX.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import ConfigError, unknown_name
from pipelines.model_sources import TORCHVISION_BUILDERS, torchvision_model, user_model

__all__ = [
    "MODELS",
    "build_model",
    "model_names",
    "BasicBlock",
    "ResNet",
    "ModelSpec",
    "SMALL_INPUT_BELOW",
    "TORCHVISION_BUILDERS",
    "load_state_dict_file",
]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks with a 3x3 stride-1 stem (no max-pool): for 28x28 and 32x32 images."""

    def __init__(
        self, blocks_per_stage: list[int], widths: list[int], in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for index, (count, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            layers = []
            for block in range(count):
                stride = 2 if (index > 0 and block == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def _scaled(widths: list[int], width: float) -> list[int]:
    return [max(4, int(round(channels * width))) for channels in widths]


def resnet18(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return ResNet([2, 2, 2, 2], _scaled([64, 128, 256, 512], width), in_channels, num_classes)


def resnet20(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return ResNet([3, 3, 3], _scaled([16, 32, 64], width), in_channels, num_classes)


def resnet8(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return ResNet([1, 1, 1], _scaled([16, 32, 64], width), in_channels, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet8": resnet8,
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    """Build a registered model. ``width`` scales every stage's channels (0.25 .. 4)."""
    if name not in MODELS:
        raise unknown_name("model.arch", name, model_names())
    if not 0.0625 <= width <= 8.0:
        raise ConfigError(f"model.width: {width} is out of range; use a multiplier between 0.0625 and 8.")
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(
            f"model: in_channels={in_channels}, num_classes={num_classes}; need >= 1 channel and >= 2 classes."
        )
    return MODELS[name](in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------------------
# ModelSpec: registry, torchvision or user models

TORCHVISION_PREFIX = "torchvision:"
SMALL_INPUT_BELOW = 64  # ``small_input: auto`` swaps the stem for images smaller than this (pixels)


@dataclass(frozen=True)
class ModelSpec:
    """What model to compress; validates itself. ``build`` makes it for a dataset.

    - ``arch``: a registry name (``resnet20``), ``torchvision:<builder>`` or ``module.path:callable``.
    - ``width``: channel multiplier of registry models (others: scale through ``kwargs``, e.g.
      ``{"width_mult": 0.5}`` for MobileNets).
    - ``small_input``: ``True`` / ``False`` / ``"auto"`` (images under ``SMALL_INPUT_BELOW`` px): torchvision
      models get a stride-1 stem without max-pool. Registry models are small-input models already.
    - ``kwargs``: keyword arguments of the torchvision builder or the user's callable (JSON values).
    - ``exclude``: module names (and everything under them) that pruning leaves untouched.
    - ``checkpoint``: a state_dict file of trained fp32 weights to start from.

    Example: ``ModelSpec("torchvision:mobilenet_v2", small_input="auto").build(1, 10, 28)``.
    """

    arch: str
    width: float = 1.0
    small_input: bool | str = "auto"
    kwargs: dict = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(
                f"model.arch: {self.arch!r} is not a model name; use a registry name "
                f"({', '.join(model_names())}), torchvision:<builder> or module.path:callable."
            )
        if self.kind == "registry" and self.arch not in MODELS:
            raise ConfigError(
                f"model.arch: unknown value {self.arch!r}. Use a registry name ({', '.join(model_names())}), "
                "torchvision:<builder> (e.g. torchvision:resnet18) or module.path:callable for your own code."
            )
        if self.kind == "torchvision" and self.builder not in TORCHVISION_BUILDERS:
            raise unknown_name(
                "model.arch", self.arch, [TORCHVISION_PREFIX + name for name in TORCHVISION_BUILDERS]
            )
        if self.kind == "callable":
            module_name, _, attribute = self.arch.rpartition(":")
            if not module_name or not attribute.isidentifier():
                raise ConfigError(
                    f"model.arch: {self.arch!r} is not module.path:callable; write e.g. mypackage.nets:build_net."
                )
        if isinstance(self.width, bool) or not isinstance(self.width, int | float):
            raise ConfigError(f"model.width: {self.width!r} is not a number; use a multiplier such as 0.5.")
        if not 0.0625 <= self.width <= 8.0:
            raise ConfigError(
                f"model.width: {self.width} is out of range; use a multiplier between 0.0625 and 8."
            )
        if self.kind != "registry" and self.width != 1.0:
            raise ConfigError(
                f"model.width: {self.width} applies to registry models only; {self.arch!r} takes its size "
                "from model.kwargs (e.g. width_mult for MobileNets). Remove model.width."
            )
        if isinstance(self.small_input, str) and self.small_input.lower() in ("true", "false", "auto"):
            normalised = {"true": True, "false": False}.get(self.small_input.lower(), "auto")
            object.__setattr__(self, "small_input", normalised)
        if not (isinstance(self.small_input, bool) or self.small_input == "auto"):
            raise ConfigError(f"model.small_input: {self.small_input!r} is not one of true, false, auto.")
        if not isinstance(self.kwargs, dict) or not all(isinstance(key, str) for key in self.kwargs):
            raise ConfigError(f"model.kwargs: {self.kwargs!r} is not a mapping of names to values.")
        try:
            json.dumps(self.kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(
                f"model.kwargs: {self.kwargs!r} holds a value that is not plain data ({error})."
            ) from error
        if self.kind == "registry" and self.kwargs:
            raise ConfigError(
                f"model.kwargs: registry model {self.arch!r} takes no keyword arguments; remove model.kwargs "
                "(use model.width to scale it)."
            )
        if isinstance(self.exclude, str) or not all(isinstance(name, str) and name for name in self.exclude):
            raise ConfigError(f"model.exclude: {self.exclude!r} is not a list of module names.")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint):
            raise ConfigError(f"model.checkpoint: {self.checkpoint!r} is not a file path.")

    @property
    def kind(self) -> str:
        """``registry``, ``torchvision`` or ``callable``."""
        if self.arch.startswith(TORCHVISION_PREFIX):
            return "torchvision"
        return "callable" if ":" in self.arch else "registry"

    @property
    def builder(self) -> str:
        """The torchvision builder's name (``resnet18`` of ``torchvision:resnet18``)."""
        return self.arch.removeprefix(TORCHVISION_PREFIX)

    def uses_small_input(self, image_size: int) -> bool:
        """Whether ``build`` swaps in the small-image stem for images of ``image_size`` pixels."""
        if self.small_input == "auto":
            return image_size < SMALL_INPUT_BELOW
        return bool(self.small_input)

    def build(
        self, in_channels: int, num_classes: int, image_size: int, *, with_checkpoint: bool = True
    ) -> nn.Module:
        """The model for images of ``in_channels`` x ``image_size`` x ``image_size`` and ``num_classes``;
        with the weights of ``checkpoint`` when one is set and ``with_checkpoint``."""
        if in_channels < 1 or num_classes < 2:
            raise ConfigError(
                f"model: in_channels={in_channels}, num_classes={num_classes}; need >= 1 channel and >= 2 classes."
            )
        if self.kind == "registry":
            model = build_model(self.arch, in_channels, num_classes, self.width)
        elif self.kind == "torchvision":
            model = torchvision_model(
                self.builder, self.kwargs, self.uses_small_input(image_size), in_channels, num_classes
            )
        else:
            model = user_model(self.arch, self.kwargs, in_channels, num_classes)
        if self.checkpoint is not None and with_checkpoint:
            model.load_state_dict(load_state_dict_file(self.checkpoint, model))
        return model

    def to_dict(self) -> dict:
        """JSON-able fields; ``ModelSpec.from_dict(spec.to_dict()) == spec``."""
        return {**asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelSpec:
        if not isinstance(values, dict) or "arch" not in values:
            raise ConfigError(f"model: {values!r} is not a model description (it needs an arch).")
        unknown = sorted(set(values) - {"arch", "width", "small_input", "kwargs", "exclude", "checkpoint"})
        if unknown:
            raise ConfigError(
                f"model: unknown field(s) {unknown}; valid: arch, width, small_input, kwargs, exclude, checkpoint."
            )
        values = dict(values)
        if "exclude" in values and isinstance(values["exclude"], list):
            values["exclude"] = tuple(values["exclude"])
        return cls(**values)


def load_state_dict_file(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the state_dict file ``path`` (``model.checkpoint``), checked against ``model``:
    a missing, unexpected or wrongly shaped key is a ConfigError naming the first one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"model.checkpoint: {str(path)!r} does not exist. Give the path of a state_dict file."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code or a corrupt file
        raise ConfigError(
            f"model.checkpoint: {str(path)!r} is not a plain tensor file ({type(error).__name__}). "
            "Save it with torch.save(model.state_dict(), path)."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapping
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(
            f"model.checkpoint: {str(path)!r} does not hold a state_dict (a mapping of names to tensors). "
            "Save it with torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        raise ConfigError(
            f"model.checkpoint: {str(path)!r} lacks {missing[0]!r} ({len(missing)} key(s) missing) that the "
            "model has. Check that model.arch, model.kwargs and the dataset's channels/classes match the "
            "weights."
        )
    if unexpected:
        raise ConfigError(
            f"model.checkpoint: {str(path)!r} has {unexpected[0]!r} ({len(unexpected)} unexpected key(s)) that "
            "the model lacks. Check that model.arch and model.kwargs match the weights."
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ConfigError(
                f"model.checkpoint: {str(path)!r} holds {key!r} of shape {tuple(state[key].shape)}, the model "
                f"needs {tuple(value.shape)}. Check the dataset's channels and classes and model.kwargs."
            )
    return state
