"""Model registry: small named builders that adapt to a dataset's channels and classes.

``MODELS`` is a plain dict: name -> builder(in_channels, num_classes, width) -> nn.Module.

- ``resnet18``: ResNet-18 with a CIFAR-style stem (3x3 conv, stride 1, no max-pool) suited to 28x28 /
  32x32 inputs: 11.2 M params, about 0.43 GMACs at 28x28. Strong, slow on a CPU.
- ``resnet20`` / ``resnet8``: He et al.'s CIFAR ResNets (16-32-64 channels), 0.27 M / 0.08 M params.
  Trains in minutes on a 2-core CPU.

Each residual block owns its ReLU modules (no module reuse), so the graph traces cleanly with torch.fx
for NNI's ModelSpeedup and exports to ONNX.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipelines.errors import ConfigError, unknown_name

__all__ = ["MODELS", "build_model", "model_names", "BasicBlock", "ResNet"]


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
