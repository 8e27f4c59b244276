"""pipelines.moe: config validation, sparse dispatch, combine weights, balancing loss, class groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.data import Dataset, symmetry_views
from pipelines.errors import ConfigError
from pipelines.measure import count_macs
from pipelines.models import ModelSpec, build_model
from pipelines.moe import (
    MixtureOfExperts,
    MoEConfig,
    build_moe,
    class_groups,
    moe_description,
    rebuild_moe,
    routing_table,
    warm_start_gate,
)
from pipelines.train import TrainConfig, evaluate, train


def _moe(
    num_experts: int = 3,
    top_k: int = 1,
    balance_weight: float = 0.01,
    seed: int = 0,
    routing: str = "learned",
) -> MixtureOfExperts:
    torch.manual_seed(seed)
    expert = build_model("resnet8", 3, 8, 0.5)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, balance_weight=balance_weight, routing=routing)
    return build_moe(expert, 3, cfg, seed=seed)


def _spread_gate(moe: MixtureOfExperts) -> None:
    """Swap in a linear gate on raw pixels: on random inputs it spreads samples over every expert (a fresh
    conv gate sees nearly the same pooled features for every noise image and picks one expert)."""
    torch.manual_seed(1)
    moe.gate = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, moe.num_experts))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 2, "top_k": 3}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 17}, "num_experts"),
        ({"gate_size": 0}, "gate_size"),
        ({"balance_weight": -0.1}, "balance_weight"),
    ],
)
def test_moe_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"moe.{field}"):
        MoEConfig(**kwargs)


def test_moe_config_accepts_top_k_equal_to_num_experts() -> None:
    assert MoEConfig(num_experts=4, top_k=4).top_k == 4


@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_shape_in_train_and_eval(top_k: int) -> None:
    moe = _moe(top_k=top_k)
    example = torch.randn(6, 3, 28, 28)
    assert moe.train()(example).shape == (6, 8)
    with torch.no_grad():
        assert moe.eval()(example).shape == (6, 8)
    assert moe.last_routing.shape == (6, top_k)


def test_experts_are_independent_copies() -> None:
    moe = _moe()
    assert moe.num_experts == 3
    first, second = moe.experts[0], moe.experts[1]
    assert first is not second
    assert torch.equal(first.conv1.weight, second.conv1.weight)
    with torch.no_grad():
        first.conv1.weight.add_(1.0)
    assert not torch.equal(first.conv1.weight, second.conv1.weight)


@pytest.mark.parametrize("top_k", [1, 2])
def test_only_chosen_experts_run(top_k: int) -> None:
    moe = _moe(num_experts=4, top_k=top_k).eval()
    _spread_gate(moe)
    rows_seen = [0] * moe.num_experts
    handles = [
        expert.register_forward_hook(
            lambda module, inputs, output, index=index: rows_seen.__setitem__(
                index, rows_seen[index] + inputs[0].shape[0]
            )
        )
        for index, expert in enumerate(moe.experts)
    ]
    with torch.no_grad():
        moe(torch.randn(32, 3, 28, 28))
    for handle in handles:
        handle.remove()
    chosen = torch.bincount(moe.last_routing.flatten(), minlength=moe.num_experts).tolist()
    assert rows_seen == chosen
    assert sum(rows_seen) == 32 * top_k
    assert sum(count > 0 for count in rows_seen) >= 2  # the test routes to several experts


@pytest.mark.parametrize("top_k", [1, 2])
def test_eval_output_is_the_weighted_combination(top_k: int) -> None:
    moe = _moe(num_experts=3, top_k=top_k).eval()
    _spread_gate(moe)
    with torch.no_grad():
        for index, expert in enumerate(moe.experts):  # make experts differ
            expert.fc.bias.fill_(float(index))
        example = torch.randn(10, 3, 28, 28)
        output = moe(example)
        probabilities = F.softmax(moe.gate(example), dim=1)
        top_values, top_index = probabilities.topk(top_k, dim=1)
        every_expert = torch.stack([expert(example) for expert in moe.experts], dim=1)  # (B, E, C)
        expected = torch.zeros_like(output)
        for row in range(10):
            for slot in range(top_k):
                weight = top_values[row, slot] / top_values[row].sum()
                expected[row] += weight * every_expert[row, top_index[row, slot]]
    assert torch.allclose(output, expected, atol=1e-5)


def test_top1_combine_weight_is_one_but_carries_gate_gradient() -> None:
    moe = _moe(num_experts=3, top_k=1, balance_weight=0.0).train()
    example = torch.randn(8, 3, 28, 28)
    _, _, weights = moe.route(example)
    assert torch.allclose(weights, torch.ones_like(weights))
    loss = F.cross_entropy(moe(example), torch.randint(0, 8, (8,)))
    loss.backward()
    # Without the balancing term the gate still learns from the task loss (p / p.detach()).
    assert moe.gate.fc.weight.grad is not None and moe.gate.fc.weight.grad.abs().sum() > 0


def test_auxiliary_loss_in_training_only() -> None:
    moe = _moe(num_experts=4)
    example = torch.randn(8, 3, 28, 28)
    moe.train()(example)
    auxiliary = moe.auxiliary_loss()
    assert auxiliary > 0 and auxiliary.requires_grad
    # Switch's term is balance_weight * E * sum(fraction * mean probability) >= balance_weight.
    assert auxiliary >= 0.01 - 1e-6
    with torch.no_grad():
        moe.eval()(example)
    assert moe.auxiliary_loss() == 0
    unbalanced = _moe(num_experts=4, balance_weight=0.0).train()
    unbalanced(example)
    assert unbalanced.auxiliary_loss() == 0


def test_single_sample_batches_train() -> None:
    moe = _moe(num_experts=2).train()
    output = moe(torch.randn(1, 3, 28, 28))
    assert output.shape == (1, 8)
    assert all(expert.training for expert in moe.experts)


def test_class_groups_balance_samples() -> None:
    assert class_groups(torch.arange(8).repeat(10), 8, 2).count(0) == 4
    counts = [50, 40, 30, 20, 10, 10, 5, 5]
    labels = torch.cat([torch.full((count,), cls) for cls, count in enumerate(counts)])
    assignment = class_groups(labels, 8, 3)
    assert len(assignment) == 8 and set(assignment) == {0, 1, 2}
    load = [
        sum(count for count, expert in zip(counts, assignment, strict=True) if expert == e) for e in range(3)
    ]
    assert sum(load) == sum(counts)
    assert max(load) - min(load) <= max(counts)
    assert max(load) <= 60  # greedy largest-first: 50+10 / 40+10+5+5 / 30+20+... within one class
    assert class_groups(labels, 8, 1) == [0] * 8


def test_routing_table_counts_every_sample(tiny_data: Dataset) -> None:
    moe = _moe(num_experts=3)
    table = routing_table(moe, tiny_data.val, tiny_data.num_classes)
    assert table.shape == (8, 3) and table.dtype == torch.long
    assert int(table.sum()) == len(tiny_data.val)
    assert torch.equal(table.sum(dim=1), torch.bincount(tiny_data.val.labels, minlength=8))


def test_warm_start_routes_class_groups(tiny_data: Dataset) -> None:
    moe = _moe(num_experts=2)
    assignment = warm_start_gate(moe, tiny_data.train, tiny_data.num_classes, epochs=8, seed=0)
    assert sorted(assignment).count(0) == 4
    table = routing_table(moe, tiny_data.val, tiny_data.num_classes)
    routed_to_group = sum(int(table[cls, expert]) for cls, expert in enumerate(assignment))
    assert routed_to_group / len(tiny_data.val) > 0.8
    assert not moe.gate.training


def test_moe_trains_with_the_loop(tiny_data: Dataset) -> None:
    moe = _moe(num_experts=2)
    report = train(moe, tiny_data.train, TrainConfig(epochs=1, batch_size=32))
    assert report.steps == 10 and torch.isfinite(torch.tensor(report.final_loss))
    assert 0.0 <= evaluate(moe, tiny_data.val) <= 1.0


def test_class_group_routing_trains_gate_only_on_its_targets() -> None:
    moe = _moe(num_experts=3, top_k=1, routing="class-groups").train()
    moe.class_to_expert = [0, 0, 0, 1, 1, 2, 2, 2]
    example, labels = torch.randn(8, 3, 28, 28), torch.arange(8)
    logits = moe(example)
    # the task loss does not reach the gate: routing weights are detached
    F.cross_entropy(logits, labels).backward()
    assert moe.gate.fc.weight.grad is None or moe.gate.fc.weight.grad.abs().sum() == 0
    moe.zero_grad()
    moe(example)
    auxiliary = moe.auxiliary_loss(labels)
    expected = 1.0 * F.cross_entropy(moe._gate_logits, torch.tensor(moe.class_to_expert)[labels])
    assert torch.allclose(auxiliary, expected)
    auxiliary.backward()
    assert moe.gate.fc.weight.grad.abs().sum() > 0


def test_confusion_aware_groups_keep_confused_classes_together() -> None:
    labels = torch.arange(6).repeat(10)  # six equal classes
    similarity = torch.zeros(6, 6)
    for first, second in ((0, 3), (1, 4), (2, 5)):  # pairs the teacher confuses
        similarity[first, second] = similarity[second, first] = 0.3
    assignment = class_groups(labels, 6, 3, similarity)
    assert (
        assignment[0] == assignment[3] and assignment[1] == assignment[4] and assignment[2] == assignment[5]
    )
    assert len(set(assignment)) == 3
    # balance still holds: no group over 1.25x its fair share even when one class is similar to all
    similarity[0, :] = similarity[:, 0] = 0.9
    assignment = class_groups(labels, 6, 3, similarity)
    assert max(assignment.count(expert) for expert in range(3)) <= 2


def test_one_expert_skips_the_gate() -> None:
    from pipelines.measure import count_macs

    moe = _moe(num_experts=1).eval()
    example = torch.randn(4, 3, 28, 28)
    calls = []
    moe.gate.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        assert torch.equal(moe(example), moe.experts[0](example))
    assert not calls
    assert count_macs(moe, example) == count_macs(moe.experts[0], example)


@pytest.mark.parametrize("views", [2, 4, 8])
def test_test_time_views_average_the_symmetric_views_in_eval_only(views: int) -> None:
    moe = _moe(num_experts=3, top_k=2)
    _spread_gate(moe)
    example = torch.randn(5, 3, 28, 28)
    moe.eval()
    with torch.no_grad():
        single = [moe(view) for view in symmetry_views(example, "d4")[:views]]
        moe.views = views
        averaged = moe(example)
        assert torch.allclose(averaged, torch.stack(single).mean(dim=0), atol=1e-5)
        assert not torch.allclose(averaged, single[0], atol=1e-3)  # the views really differ
        moe.train()
        assert moe(example).shape == (5, 8)  # training sees one view per sample
    moe.views = 1
    one_view = count_macs(moe, example)
    moe.views = views
    assert count_macs(moe, example) == views * one_view  # top-2 of equal experts: every view costs the same


def test_views_are_validated_and_kept_by_the_checkpoint_description() -> None:
    with pytest.raises(ConfigError, match="moe.views"):
        MoEConfig(views=3)
    moe = build_moe(build_model("resnet8", 3, 8, 0.5), 3, MoEConfig(num_experts=2, views=4))
    assert moe.views == 4
    description = moe_description(ModelSpec("resnet8", width=0.5), 3, 8, 28, moe, 8)
    rebuilt = rebuild_moe(description, {}, moe.state_dict())
    assert rebuilt.views == 4
