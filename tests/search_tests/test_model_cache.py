"""The model cache: what determines a trained model's key, and one training per key."""

from __future__ import annotations

from pathlib import Path

import torch

from search.config import Budget
from search.model_cache import ModelCache, TrainedModel, inference_settings, model_key
from search.record import Training

BUDGET = Budget()


def _config(**overrides) -> dict:
    config = {
        "sparsity": 0.5,
        "pruner": "l1",
        "bits": 8,
        "quantizer": "qat",
        "num_experts": 2,
        "top_k": 1,
        "gate_size": 4,
        "routing": "class-groups",
        "effective_top_k": 1,
    }
    return {**config, **overrides}


def _key(params: dict, budget: Budget = BUDGET, seed: int = 0, setup: str = "setup") -> str:
    return model_key(params, budget, seed, setup)


def test_every_model_parameter_budget_seed_and_setup_change_the_key() -> None:
    key = _key(_config())
    assert _key(_config()) == key
    assert _key(_config(sparsity=0.6)) != key
    assert _key(_config(bits=4)) != key
    assert _key(_config(pruner="fpgm")) != key
    assert _key(_config(), budget=Budget(finetune_epochs=2.0)) != key
    assert _key(_config(), seed=1) != key
    assert _key(_config(), setup="another teacher") != key


def test_top_k_counts_only_through_its_clipped_value() -> None:
    """One expert with top_k 2 runs exactly as one expert with top_k 1."""
    single = _key(_config(num_experts=1, top_k=1, effective_top_k=1))
    assert _key(_config(num_experts=1, top_k=2, effective_top_k=1)) == single
    assert _key(_config(num_experts=2, top_k=2, effective_top_k=2)) != _key(_config(num_experts=2))


def test_a_single_expert_ignores_what_only_a_gate_uses() -> None:
    """Without a gate, gate size, routing and expert origin change nothing: not worth a second training."""
    single = _config(num_experts=1, effective_top_k=1)
    gate_changes = {"gate_size": 16, "routing": "learned", "expert_init": "teachers"}
    assert _key({**single, **gate_changes}) == _key(single)
    assert _key({**single, "sparsity": 0.6, "gate_size": 16}) != _key(single)
    assert _key(_config(expert_init="teachers")) != _key(_config(expert_init="copies"))
    assert _key(_config(gate_size=16)) != _key(_config())


def test_views_change_inference_not_the_model() -> None:
    assert _key(_config(views=2)) == _key(_config(views=1)) == _key(_config())
    assert inference_settings(_config(views=2)) != inference_settings(_config())
    assert inference_settings(_config(views=1)) == inference_settings(_config())  # default: one view


def _trained(seed: int) -> TrainedModel:
    from pipelines.models import ModelSpec, build_model
    from pipelines.moe import MoEConfig, build_moe, moe_description

    torch.manual_seed(seed)
    moe = build_moe(
        build_model("resnet8", 3, 4, 0.25), 3, MoEConfig(num_experts=2, top_k=1, gate_size=4), seed
    )
    description = moe_description(ModelSpec("resnet8", width=0.25), 3, 4, 28, moe, 4)
    training = Training(expert_params=10, achieved_sparsity=0.0, class_assignment=None, stage_val_accuracy={})
    return TrainedModel(moe, {**description, "bits_by_layer": {}}, training, {"finetune": 1.0})


def test_get_or_train_trains_once_and_returns_the_same_weights(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "models")
    calls = []

    def train() -> TrainedModel:
        calls.append(1)
        return _trained(seed=len(calls))

    first, trained = cache.get_or_train("key", train)
    again, trained_again = cache.get_or_train("key", train)
    assert (trained, trained_again, len(calls)) == (True, False, 1)
    assert again.training == first.training and again.seconds == {}  # nothing was spent on training now
    for name, tensor in first.moe.state_dict().items():
        assert torch.equal(tensor, again.moe.state_dict()[name]), name
    assert cache.get("other") is None
    assert not list((tmp_path / "models").glob("*.partial"))
