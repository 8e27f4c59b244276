"""The whole hybrid pipeline (prune -> KD fine-tune -> MoE -> QAT) on the synthetic dataset."""

from __future__ import annotations

import pytest
import torch

from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset
from pipelines.errors import ConfigError
from pipelines.hybrid import HybridConfig, StageBudget, compress_hybrid
from pipelines.measure import count_macs, packed_size_bytes
from pipelines.models import build_model
from pipelines.moe import MoEConfig
from pipelines.train import TrainConfig, evaluate, train

BUDGET = StageBudget(
    finetune_epochs=1.0,
    gate_epochs=0.3,
    moe_epochs=0.5,
    qat_epochs=0.3,
    train=TrainConfig(lr=0.05, batch_size=32, kd_alpha=0.5, augment="none"),
)


@pytest.fixture(scope="module")
def teacher(tiny_data: Dataset) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet8", tiny_data.channels, tiny_data.num_classes)
    train(model, tiny_data.train, TrainConfig(epochs=4, lr=0.05, batch_size=32))
    assert evaluate(model, tiny_data.val) > 0.8  # a teacher worth compressing
    return model.eval()


def _on_grid(weight: torch.Tensor, bits: int) -> bool:
    """Every output channel holds at most 2**bits distinct values (symmetric per-channel grid)."""
    return all(row.unique().numel() <= 2**bits for row in weight.reshape(weight.shape[0], -1))


@pytest.mark.parametrize("num_experts", [1, 2])
def test_quantized_moe_of_any_expert_count(
    teacher: torch.nn.Module, tiny_data: Dataset, num_experts: int
) -> None:
    """One expert skips its gate; QAT must neither need nor count that gate (it never runs)."""
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5, pruner="l1"),
        quantize=QuantizeConfig(bits=4),
        moe=MoEConfig(num_experts=num_experts, top_k=1, gate_size=4),
    )
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    stages: list[tuple[str, float, float]] = []
    result = compress_hybrid(
        teacher, tiny_data, cfg, BUDGET, seed=0, on_stage=lambda *finished: stages.append(finished)
    )
    # each stage reported as it finished, with its seconds and validation accuracy
    assert [stage for stage, _, _ in stages] == ["prune", "finetune", "moe", "quantize"]
    assert all(seconds == result.seconds[stage] for stage, seconds, _ in stages)
    assert stages[-1][2] == result.stage_accuracy["quantized"]

    # The teacher is untouched; channels were really removed.
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert result.expert_params < result.params_before
    assert result.achieved_sparsity > 0.3
    # Stage record: every stage timed and evaluated.
    assert set(result.stage_accuracy) == {"pruned", "finetuned", "moe", "quantized"}
    assert {"prune", "finetune", "moe", "quantize"} <= set(result.seconds)

    gate_layers = [name for name in result.bits_by_layer if name.startswith("gate.")]
    moe = result.moe
    if num_experts == 1:
        assert gate_layers == []
        assert moe.idle_parts == ("gate.",)
    else:
        assert gate_layers and all(result.bits_by_layer[name] == 8 for name in gate_layers)
    # Inner layers sit on the 4-bit grid; the deployed size counts only parts that run.
    inner = [name for name, bits in result.bits_by_layer.items() if bits == 4]
    assert inner
    assert all(_on_grid(moe.get_submodule(name).weight.detach(), 4) for name in inner)
    full = packed_size_bytes(moe, lambda name: result.bits_by_layer.get(name, 32))
    deployed = packed_size_bytes(moe, lambda name: result.bits_by_layer.get(name, 32), skip=moe.idle_parts)
    assert (deployed < full) == (num_experts == 1)
    # The compressed MoE still classifies far above chance (1/8) and costs less than the teacher.
    assert result.stage_accuracy["quantized"] > 0.7
    example = tiny_data.val.images[:8]
    assert count_macs(moe.eval(), example) < count_macs(teacher, example)


def test_unpruned_single_expert_skips_recovery_training(teacher: torch.nn.Module, tiny_data: Dataset) -> None:
    """Sparsity 0 with one expert is the teacher: no fine-tune, no MoE training, same predictions."""
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.0),
        quantize=QuantizeConfig(bits=32),
        moe=MoEConfig(num_experts=1, top_k=1),
    )
    result = compress_hybrid(teacher, tiny_data, cfg, BUDGET, seed=0)
    assert "finetune" not in result.seconds
    images = tiny_data.val.images[:32]
    with torch.no_grad():
        assert torch.allclose(result.moe.eval()(images), teacher(images), atol=1e-5)


def test_experts_from_different_teachers_start_as_different_networks(
    teacher: torch.nn.Module, tiny_data: Dataset
) -> None:
    """expert_init teachers: expert i comes from teacher i mod N (here 3 experts, 2 teachers), each
    fine-tuned on its own; a third expert is a copy of the first origin, trained in the MoE stage."""
    torch.manual_seed(1)
    other = build_model("resnet8", tiny_data.channels, tiny_data.num_classes)
    train(other, tiny_data.train, TrainConfig(epochs=4, lr=0.05, batch_size=32, seed=1))
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5, pruner="l2"),
        quantize=QuantizeConfig(bits=32),  # fp32: no QAT step moves the experts after assembly
        moe=MoEConfig(num_experts=3, top_k=2, gate_size=4),
        expert_init="teachers",
    )
    budget = StageBudget(
        finetune_epochs=0.5, gate_epochs=0.2, moe_epochs=0.0, qat_epochs=0.2, train=BUDGET.train
    )
    result = compress_hybrid(teacher, tiny_data, cfg, budget, seed=0, sources=[teacher, other])
    first, second, third = (expert.conv1.weight.detach() for expert in result.moe.experts)
    assert first.shape == second.shape and not torch.allclose(first, second, atol=1e-2)
    assert torch.equal(first, third)  # no MoE epochs: the copy of origin 0 is unchanged
    # means over the two origins: fine-tuning each recovered accuracy lost to pruning
    assert result.stage_accuracy["finetuned"] > result.stage_accuracy["pruned"]

    with pytest.raises(ConfigError, match=r"expert_init: 'teachers'.*baseline.teachers"):
        compress_hybrid(teacher, tiny_data, cfg, budget, seed=0, sources=[teacher])
    with pytest.raises(ConfigError, match=r"expert_init: unknown value 'clones'"):
        HybridConfig(prune=cfg.prune, quantize=cfg.quantize, moe=cfg.moe, expert_init="clones")


def test_bf16_training_runs_every_stage(teacher: torch.nn.Module, tiny_data: Dataset) -> None:
    """precision: bf16 through pruning's fine-tune, the 2-expert MoE's sparse dispatch and NNI's QAT:
    every stage trains under autocast and the compressed MoE is as good as the fp32 path's bar."""
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5, pruner="l1"),
        quantize=QuantizeConfig(bits=4),
        moe=MoEConfig(num_experts=2, top_k=1, gate_size=4),
    )
    budget = StageBudget(
        finetune_epochs=BUDGET.finetune_epochs,
        gate_epochs=BUDGET.gate_epochs,
        moe_epochs=BUDGET.moe_epochs,
        qat_epochs=BUDGET.qat_epochs,
        train=BUDGET.train.replace(precision="bf16"),
    )
    result = compress_hybrid(teacher, tiny_data, cfg, budget, seed=0)
    assert result.stage_accuracy["quantized"] > 0.7
    assert all(p.dtype == torch.float32 for p in result.moe.parameters())
    inner = [name for name, bits in result.bits_by_layer.items() if bits == 4]
    assert inner and all(_on_grid(result.moe.get_submodule(name).weight.detach(), 4) for name in inner)
