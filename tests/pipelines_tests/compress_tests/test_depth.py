"""pipelines.compress.depth: residual blocks are physically removed (fewer layers run, are counted and are
exported), the choice is deterministic, checkpoints rebuild the shallower model, bad requests fail clearly."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from pipelines.compress.depth import DepthConfig, RemovedBlock, removable_blocks, remove_blocks
from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.deploy.onnx import export_onnx
from pipelines.errors import CompressionError, ConfigError
from pipelines.hybrid import HybridConfig, compress_expert
from pipelines.measure import count_macs, count_params
from pipelines.models import BasicBlock, ModelSpec, build_model
from pipelines.moe import MoEConfig
from pipelines.serialize import describe_model, load_checkpoint, rebuild_model, save_checkpoint

IMAGES = torch.randn(48, 3, 28, 28)
EXAMPLE = IMAGES[:2]


def _blocks(model: nn.Module) -> int:
    return sum(isinstance(module, BasicBlock) for module in model.modules())


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", 3, 8, 0.5).eval()


def _conv_nodes(path: Path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def test_removing_blocks_makes_the_model_shallower(resnet20: nn.Module, tmp_path: Path) -> None:
    original = {key: value.clone() for key, value in resnet20.state_dict().items()}
    # every block of ResNet-20 whose shortcut is the identity: the first stage's three (16 -> 16, stride 1)
    # and the non-first blocks of the two later stages
    assert removable_blocks(resnet20, EXAMPLE) == [
        "layers.0.0", "layers.0.1", "layers.0.2", "layers.1.1", "layers.1.2", "layers.2.1", "layers.2.2"
    ]  # fmt: skip
    result = remove_blocks(resnet20, DepthConfig(blocks_removed=3), IMAGES)
    shallow = result.model
    assert len(result.removed) == 3 and set(result.removed) <= set(result.candidates)
    assert _blocks(shallow) == _blocks(resnet20) - 3 == 6
    assert sum(isinstance(module, RemovedBlock) for module in shallow.modules()) == 3
    assert count_params(shallow) < count_params(resnet20)
    with torch.no_grad():
        output = shallow(torch.randn(5, 3, 28, 28))
    assert output.shape == (5, 8) and torch.isfinite(output).all()
    assert result.macs_before == count_macs(resnet20, EXAMPLE[:1])
    assert result.macs_after == count_macs(shallow, EXAMPLE) < result.macs_before
    # the exported graph has two convs fewer per removed block
    full = _conv_nodes(export_onnx(resnet20, EXAMPLE, tmp_path / "full.onnx"))
    reduced = _conv_nodes(export_onnx(shallow, EXAMPLE, tmp_path / "shallow.onnx"))
    assert reduced == full - 2 * 3
    # the input model is untouched
    assert _blocks(resnet20) == 9
    assert all(torch.equal(original[key], value) for key, value in resnet20.state_dict().items())


def test_the_choice_is_deterministic_nested_and_spares_the_most_useful_block() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 3, 8, 0.5).eval()
    # a block whose residual branch outputs zeros changes nothing when bypassed: it goes first
    with torch.no_grad():
        model.layers[1][2].bn2.weight.zero_()
        model.layers[1][2].bn2.bias.zero_()
    two = remove_blocks(model, DepthConfig(blocks_removed=2), IMAGES)
    assert two.removed[0] == "layers.1.2" and two.scores["layers.1.2"] == pytest.approx(0.0, abs=1e-6)
    assert remove_blocks(model, DepthConfig(blocks_removed=2), IMAGES).removed == two.removed
    # greedy: a larger request removes the smaller one's blocks first
    assert remove_blocks(model, DepthConfig(blocks_removed=4), IMAGES).removed[:2] == two.removed
    # a fraction counts the removable blocks: half of 7 rounds to 4
    assert len(remove_blocks(model, DepthConfig(blocks_removed=0.5), IMAGES).removed) == 4


def test_zero_removes_nothing(resnet20: nn.Module) -> None:
    result = remove_blocks(resnet20, DepthConfig(), IMAGES)
    assert result.removed == () and result.macs_after == result.macs_before
    assert not DepthConfig(blocks_removed=0.0).active


def test_a_shallower_model_round_trips_through_a_checkpoint(resnet20: nn.Module, tmp_path: Path) -> None:
    cfg = HybridConfig(
        PruneConfig(sparsity=0.5, channel_multiple=4),
        QuantizeConfig(),
        MoEConfig(),
        depth=DepthConfig(blocks_removed=2),
    )
    expert = compress_expert(resnet20, cfg, IMAGES, EXAMPLE).model  # removed blocks, then pruned
    assert _blocks(expert) == 7 and expert.conv1.out_channels < resnet20.conv1.out_channels
    description = describe_model(ModelSpec("resnet20", width=0.5), 3, 8, 28)
    save_checkpoint(expert, tmp_path / "model", description)
    rebuilt = rebuild_model(*load_checkpoint(tmp_path / "model"))
    assert _blocks(rebuilt) == 7
    images = torch.randn(6, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), expert(images))


def test_a_model_without_removable_blocks_fails_clearly() -> None:
    resnet8 = build_model("resnet8", 3, 8, 0.5)  # one block per stage; only the first keeps its shape
    assert removable_blocks(resnet8, EXAMPLE) == ["layers.0.0"]
    with pytest.raises(CompressionError, match="more than the 1 removable blocks.*Use at most 1"):
        remove_blocks(resnet8, DepthConfig(blocks_removed=2), IMAGES)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8))
    with pytest.raises(CompressionError, match="has none that can go.*Set blocks_removed to 0"):
        remove_blocks(plain, DepthConfig(blocks_removed=1), IMAGES)
    assert remove_blocks(plain, DepthConfig(blocks_removed=0), IMAGES).removed == ()


@pytest.mark.parametrize("value", [-1, 1.5, -0.1, True, "2"])
def test_a_bad_request_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="depth.blocks_removed"):
        DepthConfig(blocks_removed=value)


def test_torchvision_resnet18_loses_blocks_without_a_downsample() -> None:
    model = ModelSpec("torchvision:resnet18", small_input=True).build(3, 8, 28).eval()
    candidates = removable_blocks(model, EXAMPLE)
    # the first block of layer1 (64 -> 64) and the second block of every stage; no block with a downsample
    assert candidates == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    result = remove_blocks(model, DepthConfig(blocks_removed=2), IMAGES[:8])
    assert all(isinstance(model.get_submodule(name).downsample, type(None)) for name in result.removed)
    assert result.macs_after < result.macs_before
    with torch.no_grad():
        assert result.model(EXAMPLE).shape == (2, 8)


def test_latency_ranking_trades_output_change_for_time_saved(resnet20: nn.Module) -> None:
    """ranking 'latency' divides each block's output change by its share of latency: with every share
    equal it picks what 'output' picks; a block given a hundredfold share goes first, whatever its change."""
    names = removable_blocks(resnet20, EXAMPLE)
    by_output = remove_blocks(resnet20, DepthConfig(blocks_removed=2), IMAGES).removed
    equal = tuple((name, 0.1) for name in names)
    assert (
        remove_blocks(resnet20, DepthConfig(2, ranking="latency", block_time=equal), IMAGES).removed
        == by_output
    )
    last = next(name for name in reversed(names) if name not in by_output)  # not chosen on its output change
    slow = tuple((name, 0.9 if name == last else 0.009) for name in names)
    latency = remove_blocks(resnet20, DepthConfig(1, ranking="latency", block_time=slow), IMAGES)
    assert latency.removed == (last,)
    with pytest.raises(ConfigError, match=r"depth.block_time has none for layers.2.2.*ranking 'output'"):
        remove_blocks(resnet20, DepthConfig(1, ranking="latency", block_time=equal[:-1]), IMAGES)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"ranking": "speed"}, ["depth.ranking", "speed", "output", "latency"]),
        ({"block_time": (("layers.0.1", 0.0),)}, ["depth.block_time", "layers.0.1", "(0, 1]"]),
        ({"block_time": (("layers.0.1", 1.5),)}, ["depth.block_time", "1.5"]),
    ],
)
def test_a_bad_ranking_or_share_is_a_config_error(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        DepthConfig(1, **kwargs)
    assert all(word in str(error.value) for word in words)
