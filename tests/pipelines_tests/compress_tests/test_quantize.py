"""pipelines.compress.quantize: NNI QAT + baking puts every weight on the int-b grid of its layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipelines.compress.quantize import BITS, QuantizeConfig, QuantizeResult, quantize
from pipelines.data import Dataset
from pipelines.errors import ConfigError
from pipelines.models import build_model
from pipelines.train import TrainConfig

QAT = TrainConfig(epochs=0.2, batch_size=32, augment="none")
EDGE_LAYERS = ("conv1", "fc")


def _max_distinct_per_row(weight: torch.Tensor) -> int:
    rows = weight.detach().reshape(weight.shape[0], -1)
    return max(len(torch.unique(row)) for row in rows)


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)
    }


def _quantized(tiny_data: Dataset, bits: int) -> tuple[nn.Module, nn.Module, QuantizeResult]:
    """(a copy of the model before QAT, the quantized model, the result)."""
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 8, 0.5)
    original = copy.deepcopy(model)
    result = quantize(
        model, QuantizeConfig(bits=bits), tiny_data.train, QAT, None, tiny_data.train.images[:2]
    )
    return original, result.model, result


@pytest.fixture(scope="module")
def four_bit(tiny_data: Dataset) -> tuple[nn.Module, nn.Module, QuantizeResult]:
    return _quantized(tiny_data, 4)


def test_four_bit_rows_take_at_most_fifteen_values(four_bit) -> None:
    original, model, result = four_bit
    layers = _weight_layers(model)
    assert set(result.bits_by_layer) == set(layers)
    for name, module in layers.items():
        if name in EDGE_LAYERS:
            continue
        assert result.bits_of(name) == 4
        assert _max_distinct_per_row(module.weight) <= 2**4 - 1, name
    # The check is not vacuous: before quantization the rows had far more distinct values.
    assert _max_distinct_per_row(_weight_layers(original)["layers.2.0.conv2"].weight) > 15


def test_first_conv_and_classifier_keep_eight_bits(four_bit) -> None:
    _, model, result = four_bit
    assert {name: result.bits_of(name) for name in EDGE_LAYERS} == {"conv1": 8, "fc": 8}
    layers = _weight_layers(model)
    for name in EDGE_LAYERS:
        distinct = _max_distinct_per_row(layers[name].weight)
        assert 15 < distinct <= 2**8 - 1, name  # quantized at 8 bits, not at 4
    assert result.bits_of("not.a.layer") == 32


def test_eight_bit_rows_take_at_most_255_values(tiny_data: Dataset) -> None:
    original, model, result = _quantized(tiny_data, 8)
    assert set(result.bits_by_layer.values()) == {8}
    weight = _weight_layers(model)["layers.2.0.conv2"].weight  # rows of 32 * 9 = 288 weights
    assert weight[0].numel() > 255
    assert _max_distinct_per_row(_weight_layers(original)["layers.2.0.conv2"].weight) > 255
    assert _max_distinct_per_row(weight) <= 255
    for module in _weight_layers(model).values():
        assert _max_distinct_per_row(module.weight) <= 255


def test_quantized_weights_are_symmetric_multiples_of_a_row_scale(tiny_data: Dataset) -> None:
    """Baked weights are level * scale with integer levels in [-(2^(b-1)-1), 2^(b-1)-1]."""
    _, model, _ = _quantized(tiny_data, 3)
    weight = _weight_layers(model)["layers.1.0.conv1"].weight.detach().reshape(16, -1)
    for row in weight:
        scale = row.abs().max() / 3  # int3: levels -3..3; QAT keeps each row's largest weight on the edge
        if scale == 0:
            continue
        levels = row / scale
        assert torch.allclose(levels, levels.round(), atol=1e-3)
        assert levels.abs().max() <= 3 + 1e-4


def test_quantized_model_is_plain_and_runs(four_bit, tiny_data: Dataset) -> None:
    original, model, _ = four_bit
    # NNI's wrappers are gone: same modules and state_dict keys as before, nothing from nni left.
    assert not any(type(module).__module__.startswith("nni") for module in model.modules())
    assert set(model.state_dict()) == set(original.state_dict())
    assert not model.training
    changed = [
        name
        for name, value in model.state_dict().items()
        if not torch.equal(value, original.state_dict()[name])
    ]
    assert "layers.0.0.conv1.weight" in changed
    with torch.no_grad():
        output = model(tiny_data.val.images[:5])
    assert output.shape == (5, 8) and torch.isfinite(output).all()


def test_thirty_two_bits_is_a_no_op(tiny_data: Dataset) -> None:
    model = build_model("resnet8", 3, 8, 0.5)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    result = quantize(model, QuantizeConfig(bits=32), tiny_data.train, QAT, None, tiny_data.train.images[:2])
    assert result.model is model and result.bits_by_layer == {}
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize(("field", "value"), [("bits", 1), ("bits", 16), ("bits", 0), ("first_last_bits", 9)])
def test_unsupported_bits_are_config_errors(field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"quantize.{field}"):
        QuantizeConfig(**{field: value})


def test_supported_bits() -> None:
    assert BITS == (2, 3, 4, 5, 6, 7, 8, 32)
    assert all(QuantizeConfig(bits=bits).bits == bits for bits in BITS)


def test_post_training_quantization_puts_weights_on_the_grid_without_training(tiny_data) -> None:
    import copy

    from pipelines.compress.quantize import QuantizeConfig, quantize
    from pipelines.models import build_model
    from pipelines.train import TrainConfig

    model = build_model("resnet8", 3, 8, 0.5)
    before = copy.deepcopy(model.state_dict())
    result = quantize(
        model,
        QuantizeConfig(bits=4, method="ptq"),
        tiny_data.train,
        TrainConfig(epochs=1),
        None,
        tiny_data.val.images[:2],
    )
    conv = result.model.layers[0][0].conv1.weight.detach()
    for row in conv.reshape(conv.shape[0], -1):
        assert row.unique().numel() <= 15
    # no training happened: BatchNorm statistics are untouched
    assert torch.equal(result.model.bn1.running_mean, before["bn1.running_mean"])
