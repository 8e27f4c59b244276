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
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
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


def not_a_model(num_classes: int) -> str:
    return f"{num_classes} classes"
