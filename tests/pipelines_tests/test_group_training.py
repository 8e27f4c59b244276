"""pipelines.group_training (``moe.expert_training: group``): each expert learns only its class group's rows;
the gate and the shared trunk are left as they are; the option is validated and joint stays the default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset, Split
from pipelines.errors import ConfigError
from pipelines.group_training import group_rows, train_on_groups
from pipelines.hybrid import HybridConfig, StageBudget, compress_hybrid
from pipelines.models import build_model
from pipelines.moe import MixtureOfExperts, MoEConfig, build_moe
from pipelines.train import TrainConfig

CONFIG = TrainConfig(epochs=1, lr=0.05, batch_size=8, augment="none")


def _labelled(labels: list[int]) -> Split:
    """Images whose every pixel is their label (so an expert's input tells which rows it saw)."""
    label_tensor = torch.tensor(labels)
    images = label_tensor.float().view(-1, 1, 1, 1).expand(-1, 3, 28, 28).clone()
    return Split(images, label_tensor)


def _moe(layout: str, num_experts: int = 3, class_to_expert: list[int] | None = None) -> MixtureOfExperts:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, layout=layout, split_at=1)
    moe = build_moe(build_model("resnet8", 3, 4, 0.5), 3, cfg)
    moe.class_to_expert = class_to_expert or [0, 1, 2, 2]
    return moe


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _same(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return all(torch.equal(before[name], value) for name, value in module.state_dict().items())


def test_group_rows_are_the_rows_of_the_groups_classes() -> None:
    labels = torch.tensor([0, 1, 2, 3, 2, 0])
    assert group_rows(labels, [0, 1, 1, 0], 0).tolist() == [0, 3, 5]
    assert group_rows(labels, [0, 1, 1, 0], 1).tolist() == [1, 2, 4]
    with pytest.raises(ConfigError, match="class_to_expert"):
        group_rows(labels, [0, 1], 0)  # labels 2 and 3 have no group


def test_each_expert_trains_on_its_groups_rows_only() -> None:
    """Separate layout: the inputs each expert sees in training are the images of its group's classes,
    every one of them once per epoch; the expert whose group has no rows and the gate stay as they were."""
    moe = _moe("separate")  # classes 0 -> expert 0, 1 -> expert 1, 2 and 3 -> expert 2
    data = _labelled([0] * 10 + [1] * 6)  # no class 2 or 3: expert 2 has no rows
    seen: dict[int, list[float]] = {index: [] for index in range(3)}

    def record(index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                seen[index].extend(inputs[0][:, 0, 0, 0].tolist())

        return hook

    for index, expert in enumerate(moe.experts):
        expert.register_forward_pre_hook(record(index))
    gate_before, idle_before = _state(moe.gate), _state(moe.experts[2])
    trained_before = [_state(moe.experts[index]) for index in (0, 1)]
    reports = train_on_groups(moe, data, CONFIG)
    assert sorted(seen[0]) == [0.0] * 10 and sorted(seen[1]) == [1.0] * 6 and seen[2] == []
    assert reports[2] is None and [report.steps for report in reports[:2]] == [2, 1]
    assert _same(idle_before, moe.experts[2]) and _same(gate_before, moe.gate)
    assert not any(_same(before, moe.experts[index]) for index, before in enumerate(trained_before))
    assert not moe.training  # handed back in eval mode


def test_the_shared_trunk_and_gate_are_frozen() -> None:
    """Shared layout: trunk and gate (weights and BatchNorm statistics) unchanged, the tails trained."""
    moe = _moe("shared", num_experts=2, class_to_expert=[0, 0, 1, 1])
    data = Split(torch.randn(32, 3, 28, 28), torch.arange(4).repeat(8))
    trunk_before, gate_before = _state(moe.trunk), _state(moe.gate)
    experts_before = [_state(expert) for expert in moe.experts]
    train_on_groups(moe, data, CONFIG)
    assert _same(trunk_before, moe.trunk) and _same(gate_before, moe.gate)
    assert not any(_same(before, expert) for before, expert in zip(experts_before, moe.experts, strict=True))


def test_precomputed_targets_follow_their_rows(monkeypatch) -> None:
    """With ``teacher_logits`` on the split, each expert's split carries the targets of its own rows."""
    import pipelines.group_training as group_training

    splits: list[Split] = []
    real = group_training.train

    def spy(model, data, cfg, teacher=None):
        splits.append(data)
        return real(model, data, cfg, teacher)

    monkeypatch.setattr(group_training, "train", spy)
    moe = _moe("separate", num_experts=2, class_to_expert=[0, 1, 1, 0])
    data = _labelled([0, 1, 2, 3] * 4)
    data = data.with_teacher_logits(torch.arange(16).float().view(-1, 1).expand(-1, 4).clone())
    train_on_groups(moe, data, CONFIG.replace(kd_alpha=0.5))
    assert [split.labels.tolist() for split in splits] == [[0, 3] * 4, [1, 2] * 4]
    for split in splits:  # row i's target is (i, i, i, i): the row of the full split it came from
        rows = split.teacher_logits[:, 0].long()
        assert torch.equal(data.labels[rows], split.labels) and torch.equal(data.images[rows], split.images)


def test_without_class_groups_it_refuses() -> None:
    moe = _moe("separate")
    moe.class_to_expert = None
    with pytest.raises(ConfigError, match="expert_training.*warm-start"):
        train_on_groups(moe, _labelled([0, 1]), CONFIG)


def test_expert_training_is_validated_and_joint_by_default() -> None:
    assert MoEConfig().expert_training == "joint"
    with pytest.raises(ConfigError, match=r"moe.expert_training: unknown value 'solo'.*group, joint"):
        MoEConfig(expert_training="solo")


def test_group_mode_in_the_pipeline_trains_the_tails_not_the_trunk(tiny_data: Dataset, monkeypatch) -> None:
    """compress_hybrid with ``expert_training: group`` runs every stage; the MoE stage leaves the shared
    trunk as the fine-tuned network's first stage (checked before quantization, which trains it)."""
    import pipelines.hybrid as hybrid

    trunks: list[dict[str, torch.Tensor]] = []
    real = hybrid.train_on_groups

    def spy(moe, data, cfg, teacher=None):
        trunks.append(_state(moe.trunk))
        reports = real(moe, data, cfg, teacher)
        trunks.append(_state(moe.trunk))
        return reports

    monkeypatch.setattr(hybrid, "train_on_groups", spy)
    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes).eval()
    cfg = HybridConfig(
        prune=PruneConfig(sparsity=0.5, pruner="l1"),
        quantize=QuantizeConfig(bits=8),
        moe=MoEConfig(num_experts=2, gate_size=4, layout="shared", split_at=1, expert_training="group"),
    )
    budget = StageBudget(
        finetune_epochs=0.2,
        gate_epochs=0.2,
        moe_epochs=0.5,
        qat_epochs=0.2,
        train=CONFIG.replace(kd_alpha=0.5),
    )
    result = compress_hybrid(teacher, tiny_data, cfg, budget, seed=0)
    assert len(trunks) == 2 and all(torch.equal(trunks[0][name], trunks[1][name]) for name in trunks[0])
    assert set(result.stage_accuracy) == {"pruned", "finetuned", "moe", "quantized"}
