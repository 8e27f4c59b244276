"""pipelines.models: the registry builds every model for any channels/classes; sizes match the papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.errors import ConfigError
from pipelines.measure import count_params
from pipelines.models import MODELS, build_model, model_names


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "num_classes"), [(1, 2), (3, 8), (3, 11)])
def test_every_model_builds_for_any_channels_and_classes(name: str, channels: int, num_classes: int) -> None:
    width = 0.25 if name == "resnet18" else 0.5
    model = build_model(name, channels, num_classes, width).eval()
    with torch.no_grad():
        output = model(torch.randn(2, channels, 28, 28))
        output_32 = model(torch.randn(2, channels, 32, 32))  # CIFAR-10 size
    assert output.shape == (2, num_classes) and output_32.shape == (2, num_classes)
    assert model.conv1.in_channels == channels
    assert model.fc.out_features == num_classes


def test_model_names_are_the_registry() -> None:
    assert model_names() == sorted(MODELS) == ["resnet18", "resnet20", "resnet8"]


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("vgg16", 3, 10)
    message = str(caught.value)
    assert "model.arch" in message and "'vgg16'" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 0.01}, "model.width"),
        ({"width": 9.0}, "model.width"),
        ({"num_classes": 1}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_bad_model_arguments_are_config_errors(kwargs: dict, field: str) -> None:
    arguments = {"name": "resnet8", "in_channels": 3, "num_classes": 10, **kwargs}
    with pytest.raises(ConfigError, match=field):
        build_model(**arguments)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("resnet8", 0.075e6, 0.082e6), ("resnet20", 0.26e6, 0.28e6), ("resnet18", 11.0e6, 11.3e6)],
)
def test_parameter_counts_match_the_published_models(name: str, low: float, high: float) -> None:
    params = count_params(build_model(name, 3, 10))
    assert low <= params <= high, f"{name}: {params} params"


def test_width_scales_every_stage() -> None:
    full = build_model("resnet20", 3, 10, 1.0)
    half = build_model("resnet20", 3, 10, 0.5)
    assert [full.conv1.out_channels, full.fc.in_features] == [16, 64]
    assert [half.conv1.out_channels, half.fc.in_features] == [8, 32]
    # Convolution weights scale with width^2: about a quarter of the parameters.
    assert 0.2 < count_params(half) / count_params(full) < 0.3


def test_models_trace_with_torch_fx() -> None:
    model = build_model("resnet20", 3, 8, 0.5).eval()
    traced = torch.fx.symbolic_trace(model)
    example = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(traced(example), model(example))
    assert any(node.op == "call_module" and node.target == "fc" for node in traced.graph.nodes)


def test_no_module_is_called_twice_per_forward() -> None:
    """Reused modules (one ReLU for two places) break NNI's speedup and PT2E: each must run once."""
    model = build_model("resnet8", 3, 8, 0.5).eval()
    calls: dict[str, int] = {}
    handles = [
        module.register_forward_hook(
            lambda module, inputs, output, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
        )
        for name, module in model.named_modules()
        if not list(module.children())
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, 28, 28))
    for handle in handles:
        handle.remove()
    assert calls and max(calls.values()) == 1
    assert sum(isinstance(module, nn.ReLU) for module in model.modules()) == sum(
        "relu" in name for name in calls
    )


def test_same_seed_builds_same_weights() -> None:
    torch.manual_seed(4)
    first = build_model("resnet8", 3, 8).state_dict()
    torch.manual_seed(4)
    second = build_model("resnet8", 3, 8).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
