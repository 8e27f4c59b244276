"""pipelines.compress.prune: NNI pruning + ModelSpeedup really removes channels, on a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.compress.prune import PRUNERS, PruneConfig, prune
from pipelines.errors import CompressionError, ConfigError
from pipelines.measure import count_macs, count_params
from pipelines.models import ModelSpec, build_model

EXAMPLE = torch.randn(2, 3, 28, 28)


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {
        name: module.out_channels for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
    }


@pytest.mark.parametrize("pruner", PRUNERS)
def test_pruning_physically_shrinks_resnet8(pruner: str) -> None:
    model = build_model("resnet8", 3, 8, 0.5).eval()
    original_state = {key: value.clone() for key, value in model.state_dict().items()}
    original_widths = _conv_widths(model)

    result = prune(model, PruneConfig(sparsity=0.5, pruner=pruner, channel_multiple=1), EXAMPLE)

    pruned_widths = _conv_widths(result.model)
    assert result.model is not model
    assert result.params_before == count_params(model) and result.params_after == count_params(result.model)
    assert result.params_after < result.params_before
    assert 0.6 < result.achieved_sparsity < 0.8  # half the channels: about a quarter of the weights remain
    assert all(pruned_widths[name] == original_widths[name] // 2 for name in original_widths)
    assert count_macs(result.model, EXAMPLE) < 0.35 * count_macs(model, EXAMPLE)
    with torch.no_grad():
        output = result.model(torch.randn(4, 3, 28, 28))
    assert output.shape == (4, 8) and torch.isfinite(output).all()
    # The input model is untouched.
    assert _conv_widths(model) == original_widths
    assert all(torch.equal(original_state[key], value) for key, value in model.state_dict().items())


def test_resnet20_dependency_groups_prune_residual_convs_together() -> None:
    model = build_model("resnet20", 3, 10)
    result = prune(model, PruneConfig(sparsity=0.5, pruner="l1", channel_multiple=1), EXAMPLE)
    # Without dependency groups speedup keeps the union of channels at every residual add (~45% kept).
    assert 0.20 <= result.params_after / result.params_before <= 0.35
    widths = _conv_widths(result.model)
    # Convs whose outputs meet at a residual add keep the same number of channels.
    assert widths["conv1"] == widths["layers.0.0.conv2"] == widths["layers.0.2.conv2"]
    assert widths["layers.1.0.conv2"] == widths["layers.1.0.shortcut.0"] == widths["layers.1.2.conv2"]


def _matching_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Index of the original row that each pruned row is (exactly) a copy of."""
    indices = []
    for row in pruned:
        matches = [index for index in range(original.shape[0]) if torch.equal(original[index], row)]
        assert len(matches) == 1
        indices.append(matches[0])
    return indices


def test_l1_keeps_the_filters_of_largest_norm() -> None:
    """Masks and speedup line up: the surviving filters are the original ones with the largest L1 norm,
    copied unchanged (checked on a conv outside any residual group)."""
    model = build_model("resnet8", 3, 8, 1.0).eval()
    pruned = prune(model, PruneConfig(sparsity=0.25, pruner="l1", channel_multiple=1), EXAMPLE).model
    # The stem's input (RGB) is never pruned, so its kept rows tell which channels feed the first block.
    kept_inputs = _matching_rows(pruned.conv1.weight, model.conv1.weight)
    assert kept_inputs == sorted(kept_inputs) and len(kept_inputs) == 12
    original = model.layers[0][0].conv1.weight
    kept_outputs = _matching_rows(pruned.layers[0][0].conv1.weight, original[:, kept_inputs])
    largest = original.abs().sum(dim=(1, 2, 3)).topk(12).indices.sort().values.tolist()
    assert kept_outputs == largest


def test_zero_sparsity_is_a_copy() -> None:
    model = build_model("resnet8", 3, 8, 0.5)
    result = prune(model, PruneConfig(sparsity=0.0), EXAMPLE)
    assert result.model is not model
    assert result.params_after == result.params_before and result.achieved_sparsity == 0.0
    with torch.no_grad():
        assert torch.equal(result.model(EXAMPLE), model.eval()(EXAMPLE))


def test_pruned_model_traces_and_trains() -> None:
    result = prune(
        build_model("resnet8", 3, 8, 0.5),
        PruneConfig(sparsity=0.5, pruner="fpgm", channel_multiple=1),
        EXAMPLE,
    )
    torch.fx.symbolic_trace(result.model)
    model = result.model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 28, 28)), torch.randint(0, 8, (8,)))
    loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_unknown_pruner_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as caught:
        PruneConfig(sparsity=0.5, pruner="taylor")
    message = str(caught.value)
    assert "prune.pruner" in message and all(name in message for name in PRUNERS)


@pytest.mark.parametrize("sparsity", [-0.1, 0.96, 1.0])
def test_out_of_range_sparsity_is_a_config_error(sparsity: float) -> None:
    with pytest.raises(ConfigError, match="prune.sparsity"):
        PruneConfig(sparsity=sparsity)


@pytest.mark.parametrize("sparsity", [0.3, 0.35, 0.6, 0.85])
def test_channel_multiple_keeps_aligned_channel_counts(sparsity: float) -> None:
    from pipelines.compress.prune import PruneConfig, prune
    from pipelines.models import build_model

    model = build_model("resnet20", 3, 8)
    pruned = prune(model, PruneConfig(sparsity, "l1", channel_multiple=8), torch.randn(2, 3, 28, 28)).model
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.out_channels % 8 == 0 for conv in convs)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    exact = prune(model, PruneConfig(sparsity, "l1", channel_multiple=1), torch.randn(2, 3, 28, 28)).model
    assert exact.conv1.out_channels == round(16 * (1 - sparsity))


# model.exclude and what NNI cannot prune ---------------------------------------------------------------

USER = "tests.pipelines_tests.user_model"


def test_excluded_modules_keep_their_channels() -> None:
    model = build_model("resnet8", 3, 8, 1.0).eval()
    example = torch.randn(2, 3, 28, 28)
    cfg = PruneConfig(sparsity=0.5, channel_multiple=1, exclude=("layers.2",))
    pruned = prune(model, cfg, example).model
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("layers.2."):
            assert pruned.get_submodule(name).out_channels == module.out_channels, name
    assert pruned.conv1.out_channels < model.conv1.out_channels


def test_exclude_that_matches_nothing_is_a_config_error() -> None:
    model = build_model("resnet8", 3, 8, 0.5)
    with pytest.raises(ConfigError, match="model.exclude: 'layer9' names no module.*'conv1'"):
        prune(model, PruneConfig(sparsity=0.5, exclude=("layer9",)), torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize(
    ("callable_name", "module", "operator"),
    [("ScaledNet", "'scale' (ChannelScale)", ""), ("SplitNet", "'conv2' (Conv2d)", "through chunk")],
)
def test_what_nni_cannot_prune_names_module_operator_and_fix(
    callable_name: str, module: str, operator: str
) -> None:
    spec = ModelSpec(f"{USER}:{callable_name}")
    model = spec.build(3, 4, 16).eval()
    example = torch.randn(2, 3, 16, 16)
    with pytest.raises(CompressionError) as caught:
        prune(model, PruneConfig(sparsity=0.5, channel_multiple=1), example)
    message = str(caught.value)
    assert module in message and operator in message and "Add 'conv1' to model.exclude" in message
    # The fix works: excluding the named conv prunes the rest.
    result = prune(model, PruneConfig(sparsity=0.5, channel_multiple=1, exclude=("conv1",)), example)
    assert result.params_after < result.params_before


def test_grouped_convs_and_their_inputs_stay_unpruned() -> None:
    model = ModelSpec(f"{USER}:GroupedNet").build(3, 4, 16).eval()
    pruned = prune(model, PruneConfig(sparsity=0.5, channel_multiple=1), torch.randn(2, 3, 16, 16)).model
    assert (pruned.conv1.out_channels, pruned.grouped.out_channels) == (16, 16)
    assert pruned.conv3.out_channels == 16 and pruned.grouped.groups == 4


def test_a_pruned_model_is_returned_in_eval_mode_with_the_teachers_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 8, 0.5).train()
    with torch.no_grad():
        model(torch.randn(64, 3, 28, 28) * 3 + 1)  # statistics far from BatchNorm's initial 0 / 1
    model.eval()
    pruned = prune(model, PruneConfig(sparsity=0.5, channel_multiple=1), EXAMPLE).model
    # ModelSpeedup's new layers start in train mode; prune's own output check must not move their statistics
    assert not any(module.training for module in pruned.modules())
    kept = set(pruned.bn1.running_mean.tolist())
    assert kept <= set(model.bn1.running_mean.tolist()) and len(kept) == pruned.bn1.num_features
