"""pipelines.moe's shared-trunk layout and pipelines.stages: split, forward, trunk once, MACs, serialize, QAT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.compress.prune import PruneConfig, prune
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset
from pipelines.errors import ConfigError
from pipelines.hybrid import HybridConfig, StageBudget, compress_hybrid
from pipelines.measure import count_macs, packed_size_bytes
from pipelines.models import ModelSpec, build_model
from pipelines.moe import MoEConfig, SharedTrunkMoE, build_moe, moe_description, rebuild_moe
from pipelines.serialize import load_checkpoint, save_checkpoint
from pipelines.stages import num_stages, split_model
from pipelines.train import TrainConfig, evaluate


def _shared(num_experts: int = 3, top_k: int = 1, split_at: int = 1, views: int = 1) -> SharedTrunkMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, layout="shared", split_at=split_at, views=views)
    moe = build_moe(build_model("resnet8", 3, 8, 0.5), 3, cfg)
    _spread(moe, _images(64))
    return moe.eval()


def _images(count: int) -> torch.Tensor:
    """Noise images of different brightness: their pooled trunk features differ (pure noise's do not)."""
    return torch.randn(count, 3, 28, 28) + torch.linspace(-2, 2, count).view(-1, 1, 1, 1)


def _spread(moe: SharedTrunkMoE, images: torch.Tensor) -> None:
    """Random images give nearly equal pooled features: normalize the gate's features on ``images`` (its
    BatchNorm statistics) and drop its bias, so routing depends on the input and spreads over the experts."""
    moe.eval()
    moe.gate.bn.reset_running_stats()
    moe.gate.bn.momentum = None
    moe.gate.bn.train()
    with torch.no_grad():
        moe.gate(moe.trunk(images))
        moe.gate.fc.bias.zero_()
        moe.gate.fc.weight.mul_(20)
    moe.eval()


@pytest.mark.parametrize(("kwargs", "field"), [({"layout": "tree"}, "layout"), ({"split_at": 0}, "split_at")])
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"moe.{field}"):
        MoEConfig(**kwargs)


def test_split_is_the_same_function_and_checks_its_range() -> None:
    model = build_model("resnet8", 3, 8, 0.5).eval()
    images = torch.randn(4, 3, 28, 28)
    assert num_stages(model) == 3
    for split_at in (1, 2):
        trunk, tail = split_model(model, split_at)
        assert torch.allclose(tail(trunk(images)), model(images), atol=1e-6)
    with pytest.raises(ConfigError, match="moe.split_at.*use 1..2"):
        split_model(model, 3)
    with pytest.raises(ConfigError, match="moe.layout.*no stage list"):
        split_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), 1)
    with pytest.raises(ConfigError, match="expert_init"):
        HybridConfig(PruneConfig(0.5), QuantizeConfig(), MoEConfig(layout="shared"), expert_init="teachers")


def test_torchvision_resnets_split_too() -> None:
    model = ModelSpec("torchvision:resnet18").build(3, 8, 28).eval()
    trunk, tail = split_model(model, 2)
    images = torch.randn(2, 3, 28, 28)
    assert num_stages(model) == 4
    assert torch.allclose(tail(trunk(images)), model(images), atol=1e-5)


@pytest.mark.parametrize("views", [1, 2])
def test_trunk_runs_once_per_input_and_experts_read_its_features(views: int) -> None:
    moe = _shared(views=views)
    trunk_batches: list[int] = []
    gate_inputs: list[tuple[int, ...]] = []
    moe.trunk.register_forward_hook(lambda _m, inputs, _o: trunk_batches.append(inputs[0].shape[0]))
    moe.gate.register_forward_hook(lambda _m, inputs, _o: gate_inputs.append(tuple(inputs[0].shape)))
    images = _images(6)
    with torch.no_grad():
        output = moe(images)
    assert output.shape == (6, 8)
    assert trunk_batches == [6 * views]  # one call, every view stacked in it
    assert gate_inputs == [(6 * views, 8, 28, 28)]  # resnet8 x0.5 stage 1: 8 channels, full resolution
    # the routed forward equals each row's chosen expert on the trunk's features
    moe.views = 1
    with torch.no_grad():
        features = moe.trunk(images)
        chosen = moe.route(images)[1][:, 0]
        expected = torch.stack([moe.experts[int(e)](features[i : i + 1])[0] for i, e in enumerate(chosen)])
        assert torch.allclose(moe(images), expected, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_macs_are_trunk_gate_and_k_experts(top_k: int) -> None:
    moe = _shared(top_k=top_k)
    images = _images(16)
    with torch.no_grad():
        features = moe.trunk(images)
        assert len(set(moe.route(images)[1][:, 0].tolist())) > 1  # a mixed batch
    trunk, gate = count_macs(moe.trunk, images), count_macs(moe.gate, features)
    tail = count_macs(moe.experts[0], features)
    assert count_macs(moe, images) == pytest.approx(trunk + gate + top_k * tail, abs=1)
    whole = build_model("resnet8", 3, 8, 0.5)
    assert trunk + tail == count_macs(whole, images)  # the network, split
    parts = packed_size_bytes(moe.trunk) + packed_size_bytes(moe.gate) + 3 * packed_size_bytes(moe.experts[0])
    assert packed_size_bytes(moe) == parts  # size counts every part


def test_a_pruned_network_splits_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """Pruning first, then splitting: the trunk's output channels are the experts' input channels; the
    checkpoint rebuilds the same model."""
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 8, 0.5)
    images = torch.randn(8, 3, 28, 28)
    pruned = prune(model, PruneConfig(sparsity=0.5), images[:2]).model
    moe = build_moe(pruned, 3, MoEConfig(num_experts=2, top_k=1, layout="shared", split_at=2, views=2))
    moe.class_to_expert = [0, 1] * 4
    moe.eval()
    assert moe.trunk.stage2[0].conv2.out_channels < 16  # pruned channels inherited
    spec = ModelSpec("resnet8", width=0.5)
    save_checkpoint(moe, tmp_path / "model", moe_description(spec, 3, 8, 28, moe, 8))
    loaded = rebuild_moe(*load_checkpoint(tmp_path / "model"))
    assert isinstance(loaded, SharedTrunkMoE) and loaded.split_at == 2 and loaded.views == 2
    assert loaded.class_to_expert == moe.class_to_expert
    with torch.no_grad():
        assert torch.equal(loaded(images), moe(images))


def test_hybrid_pipeline_builds_a_quantized_shared_moe(tiny_data: Dataset) -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.5).eval()
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5),
        quantize=QuantizeConfig(bits=4),
        moe=MoEConfig(num_experts=2, top_k=1, gate_size=4, layout="shared", split_at=1),
    )
    budget = StageBudget(
        finetune_epochs=0.2,
        gate_epochs=0.1,
        moe_epochs=0.2,
        qat_epochs=0.1,
        train=TrainConfig(lr=0.05, batch_size=64, augment="none"),
    )
    result = compress_hybrid(teacher, tiny_data, cfg, budget)
    moe = result.moe
    assert isinstance(moe, SharedTrunkMoE)
    bits = result.bits_by_layer
    assert bits["trunk.conv1"] == 8 and bits["experts.0.fc"] == 8 and bits["gate.conv"] == 8
    assert (
        bits["trunk.stage1.0.conv2"] == 4 and bits["experts.1.stage2.0.conv1"] == 4
    )  # inner layers searched
    weight = moe.experts[1].stage2[0].conv1.weight
    assert all(row.unique().numel() <= 16 for row in weight.reshape(weight.shape[0], -1))  # baked on the grid
    assert 0 <= evaluate(moe, tiny_data.val) <= 1
