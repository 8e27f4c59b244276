"""pipelines.models: the registry builds every model for any channels/classes; sizes match the papers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.errors import ConfigError
from pipelines.measure import count_macs, count_params
from pipelines.models import MODELS, ModelSpec, build_model, model_names


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


# ModelSpec: registry, torchvision and user models -------------------------------------------------------

USER = "tests.pipelines_tests.user_model"


def test_registry_spec_builds_the_same_weights_as_the_registry() -> None:
    torch.manual_seed(3)
    direct = build_model("resnet20", 3, 8, 0.5).state_dict()
    torch.manual_seed(3)
    spec = ModelSpec("resnet20", width=0.5).build(3, 8, 28).state_dict()
    assert direct.keys() == spec.keys() and all(torch.equal(direct[key], spec[key]) for key in direct)


@pytest.mark.parametrize(
    ("builder", "kwargs"),
    [
        ("resnet18", {}),
        ("resnet50", {}),
        ("vgg11_bn", {}),
        ("mobilenet_v2", {"width_mult": 0.25}),
        ("mobilenet_v3_small", {"width_mult": 0.25}),
        ("efficientnet_b0", {}),
    ],
)
def test_torchvision_builders_adapt_to_channels_classes_and_small_inputs(builder: str, kwargs: dict) -> None:
    small = ModelSpec(f"torchvision:{builder}", small_input=True, kwargs=kwargs).build(1, 7, 28).eval()
    large = ModelSpec(f"torchvision:{builder}", small_input=False, kwargs=kwargs).build(1, 7, 28).eval()
    first = next(module for module in small.modules() if isinstance(module, nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert small(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    if builder.startswith("vgg"):  # one pool fewer, a global pool and a 512-wide head instead of 7x7x4096
        pools = [sum(isinstance(layer, nn.MaxPool2d) for layer in model.features) for model in (small, large)]
        assert pools == [4, 5]
    else:  # the small-input stem keeps more resolution: more MACs for the same image
        example = torch.randn(2, 1, 28, 28)
        assert count_macs(small, example) > count_macs(large, example)
    if builder.startswith("resnet"):
        assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
        assert isinstance(small.maxpool, nn.Identity)
    elif builder.startswith("vgg"):
        assert isinstance(small.avgpool, nn.AdaptiveAvgPool2d) and small.classifier[0].in_features == 512
    else:
        assert small.features[0][0].stride == (1, 1) and large.features[0][0].stride == (2, 2)


@pytest.mark.parametrize(("size", "small"), [(28, True), (32, True), (63, True), (64, False), (224, False)])
def test_auto_small_input_is_for_images_under_64_pixels(size: int, small: bool) -> None:
    spec = ModelSpec("torchvision:resnet18")
    assert spec.small_input == "auto" and spec.uses_small_input(size) is small


def test_unknown_torchvision_builder_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        ModelSpec("torchvision:resnet19")
    message = str(caught.value)
    assert "model.arch" in message and "'torchvision:resnet19'" in message
    assert "torchvision:mobilenet_v3_small" in message and "torchvision:efficientnet_b0" in message


def test_user_callable_gets_channels_classes_and_kwargs() -> None:
    model = ModelSpec(f"{USER}:build_net", kwargs={"width": 8}).build(1, 5, 28)
    assert model.stem[0].in_channels == 1 and model.stem[0].out_channels == 8
    assert model.head[-1].out_features == 5


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (ModelSpec("no_such_package.nets:build"), "cannot import 'no_such_package.nets'"),
        (ModelSpec(f"{USER}:missing"), "has no callable 'missing'"),
        (ModelSpec(f"{USER}:not_a_model"), "not a torch nn.Module"),
        (ModelSpec(f"{USER}:build_net", kwargs={"depth": 3}), "model.kwargs"),
    ],
)
def test_bad_user_callables_are_config_errors_naming_the_fix(spec: ModelSpec, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec.build(3, 5, 28)
    assert fragment in str(caught.value) and spec.arch in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"arch": "resnet9"}, "model.arch"),
        ({"arch": "not a module:"}, "model.arch"),
        ({"arch": "torchvision:resnet18", "width": 0.5}, "model.width"),
        ({"arch": "resnet8", "small_input": "sometimes"}, "model.small_input"),
        ({"arch": "resnet8", "kwargs": {"depth": 3}}, "model.kwargs"),
        ({"arch": f"{USER}:build_net", "kwargs": {"layer": object()}}, "model.kwargs"),
        ({"arch": "resnet8", "exclude": "conv1"}, "model.exclude"),
    ],
)
def test_bad_specs_are_config_errors(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelSpec(**fields)


def test_spec_round_trips_through_json() -> None:
    import json

    spec = ModelSpec(
        "torchvision:mobilenet_v2",
        small_input="true",
        kwargs={"width_mult": 0.5},
        exclude=["features.1"],
        checkpoint="weights.pt",
    )
    assert spec.small_input is True and spec.exclude == ("features.1",)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_checkpoint_start_loads_the_users_weights(tmp_path) -> None:
    trained = ModelSpec("torchvision:mobilenet_v3_small", kwargs={"width_mult": 0.25}).build(3, 4, 28)
    path = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), path)
    spec = ModelSpec("torchvision:mobilenet_v3_small", kwargs={"width_mult": 0.25}, checkpoint=str(path))
    loaded = spec.build(3, 4, 28).state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in trained.state_dict().items())
    fresh = spec.build(3, 4, 28, with_checkpoint=False).state_dict()
    assert not all(torch.equal(value, fresh[key]) for key, value in trained.state_dict().items())


class _Pickled:
    """Code in a checkpoint must not load (weights_only)."""


def test_bad_checkpoints_name_the_first_bad_key(tmp_path) -> None:
    state = build_model("resnet8", 3, 4, 0.5).state_dict()
    cases = {
        "missing": (
            {key: value for key, value in state.items() if key != "conv1.weight"},
            "lacks 'conv1.weight'",
        ),
        "unexpected": ({**state, "extra.weight": torch.zeros(1)}, "has 'extra.weight'"),
        "shape": ({**state, "fc.weight": torch.zeros(3, 32)}, "'fc.weight' of shape (3, 32)"),
        "pickled": ({"conv1.weight": _Pickled()}, "not a plain tensor file"),
    }
    for name, (payload, fragment) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        with pytest.raises(ConfigError) as caught:
            ModelSpec("resnet8", width=0.5, checkpoint=str(path)).build(3, 4, 28)
        assert "model.checkpoint" in str(caught.value) and fragment in str(caught.value), name
    with pytest.raises(ConfigError, match="does not exist"):
        ModelSpec("resnet8", checkpoint=str(tmp_path / "absent.pt")).build(3, 4, 28)
