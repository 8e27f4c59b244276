"""A user's own network for the ``module.path:callable`` tests: a depthwise-separable residual block with
squeeze-excite, and a head that flattens a small feature map into Linear layers."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class TinyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.excite = SqueezeExcite(width, max(2, width // 4))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Linear(width * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem(x)
        out = self.relu(out + self.excite(self.pointwise(self.depthwise(out))))
        return self.head(torch.flatten(self.pool(out), 1))


def build_net(in_channels: int, num_classes: int, width: int = 16) -> nn.Module:
    """What ``model.arch: tests.pipelines_tests.user_model:build_net`` calls."""
    return TinyNet(in_channels, num_classes, width)


class NormsNet(nn.Module):
    """Norm layers NNI must shrink with their convs: GroupNorm, InstanceNorm2d, PReLU."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.instance_norm = nn.InstanceNorm2d(16, affine=True)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.prelu = nn.PReLU(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(self.conv1(x))
        out = self.instance_norm(self.conv2(out))
        out = self.prelu(self.conv3(out))
        return self.fc(out.mean((2, 3)))


class ChannelScale(nn.Module):
    """A learned per-channel scale: a parameter NNI's speedup does not know how to shrink."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class ScaledNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.scale = ChannelScale(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.scale(self.conv1(x))).mean((2, 3)))


class SplitNet(nn.Module):
    """Half of conv1's channels skip conv2 (torch.chunk + cat): NNI cannot follow the split."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)
        with torch.no_grad():  # L1 pruning keeps these six: the two halves lose unequal numbers of channels
            self.conv1.weight[:6] *= 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, processed = torch.chunk(self.conv1(x), 2, dim=1)
        return self.fc(torch.cat([kept, self.conv2(processed)], 1).mean((2, 3)))


class GroupedNet(nn.Module):
    """A grouped (not depthwise) conv: its input channels must be pruned evenly per group."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3(self.grouped(self.conv1(x))).mean((2, 3)))


def not_a_model(num_classes: int) -> str:
    return f"{num_classes} classes"
