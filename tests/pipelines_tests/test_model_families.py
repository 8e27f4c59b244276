"""Every model family through every stage: NNI prune (channels really removed) -> KD -> MoE -> QAT ->
ONNX int8 bundle with torch/engine agreement, and a checkpoint that rebuilds the compressed MoE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset
from pipelines.deploy.bundle import agreement, deploy_moe
from pipelines.deploy.runtime import load_bundle
from pipelines.hybrid import HybridConfig, StageBudget, compress_hybrid
from pipelines.measure import count_macs
from pipelines.models import ModelSpec
from pipelines.moe import MoEConfig, moe_description, rebuild_moe
from pipelines.serialize import load_checkpoint, save_checkpoint
from pipelines.train import TrainConfig

BUDGET = StageBudget(
    finetune_epochs=0.1,
    gate_epochs=0.05,
    moe_epochs=0.1,
    qat_epochs=0.1,
    train=TrainConfig(lr=0.01, batch_size=16, kd_alpha=0.5, augment="none"),
)

FAMILIES = {
    "resnet18": ModelSpec("torchvision:resnet18", small_input=True),
    "resnet50": ModelSpec("torchvision:resnet50", small_input=False),
    "vgg11_bn": ModelSpec("torchvision:vgg11_bn", small_input=True),
    "mobilenet_v2": ModelSpec("torchvision:mobilenet_v2", small_input=True, kwargs={"width_mult": 0.25}),
    "mobilenet_v3_small": ModelSpec(
        "torchvision:mobilenet_v3_small", small_input=True, kwargs={"width_mult": 0.25}
    ),
    "efficientnet_b0": ModelSpec("torchvision:efficientnet_b0", small_input=False),
    "user": ModelSpec("tests.pipelines_tests.user_model:build_net", kwargs={"width": 16}),
}
SLOW = {"resnet50", "efficientnet_b0", "vgg11_bn", "resnet18"}


def _conv_channels(model: nn.Module) -> int:
    return sum(module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d))


@pytest.mark.parametrize(
    "family", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in FAMILIES]
)
def test_family_runs_every_stage(family: str, tiny_data: Dataset, tmp_path: Path) -> None:
    spec = FAMILIES[family]
    torch.manual_seed(0)
    teacher = spec.build(tiny_data.channels, tiny_data.num_classes, tiny_data.image_size).eval()
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5, pruner="l1", channel_multiple=1),
        quantize=QuantizeConfig(bits=8),
        moe=MoEConfig(num_experts=2, top_k=1, gate_size=4),
    )
    result = compress_hybrid(teacher, tiny_data, cfg, BUDGET, seed=0)
    moe = result.moe.eval()

    # Channels physically removed (and counted so), every stage evaluated.
    example = tiny_data.val.images[:2]
    for expert in moe.experts:
        assert _conv_channels(expert) < _conv_channels(teacher)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            expert(example)
        assert count_macs(expert, example) == counter.get_total_flops() // 2 // 2
        assert count_macs(expert, example) < count_macs(teacher, example)
    assert result.expert_params < result.params_before
    assert set(result.stage_accuracy) == {"pruned", "finetuned", "moe", "quantized"}

    # The checkpoint rebuilds the pruned MoE through its ModelSpec: same weights, same outputs.
    description = moe_description(
        spec, tiny_data.channels, tiny_data.num_classes, tiny_data.image_size, moe, cfg.moe.gate_size
    )
    save_checkpoint(moe, tmp_path / "model", description)
    rebuilt = rebuild_moe(*load_checkpoint(tmp_path / "model"))
    images = tiny_data.val.images[:32]
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), moe(images), atol=1e-5)

    # ONNX fp32 reproduces torch; the int8 engine's agreement is recorded.
    deploy_moe(moe, tmp_path / "bundle", tiny_data.train.images[:32], int8=True)
    fp32 = agreement(moe, load_bundle(tmp_path / "bundle", precision="fp32"), images)
    int8 = agreement(moe, load_bundle(tmp_path / "bundle"), images)
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-3
    assert 0.0 <= int8["top1_agreement"] <= 1.0 and torch.isfinite(torch.tensor(int8["max_abs_diff"]))
