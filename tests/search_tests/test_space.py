"""The space as Optuna suggestions: numbers stay numeric, the reference trial is uncompressed, a one-choice
parameter is not suggested."""

from __future__ import annotations

import optuna

from search.config import parse_config
from search.evaluation import hybrid_config
from search.record import TrialRecord
from search.space import baseline_params, suggest


def test_suggest_keeps_numbers_numeric_and_clips_top_k() -> None:
    cfg = parse_config({"space": {"num_experts": {"low": 1, "high": 2}, "top_k": {"low": 2, "high": 2}}})
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    seen = []
    for _ in range(10):
        trial = study.ask()
        params = suggest(trial, cfg.space)
        assert isinstance(trial.distributions["sparsity"], optuna.distributions.FloatDistribution)
        assert isinstance(trial.distributions["num_experts"], optuna.distributions.IntDistribution)
        assert params["effective_top_k"] == min(params["top_k"], params["num_experts"])
        seen.append(params["num_experts"])
        study.tell(trial, [0.5, 1.0, 1.0])
    assert set(seen) == {1, 2}


def test_baseline_reference_is_uncompressed() -> None:
    space = parse_config({}).space
    params = baseline_params(space)
    assert params["sparsity"] == 0.0 and params["num_experts"] == 1
    assert "bits" not in params  # 32 is not a searched choice, so it is not enqueued as a parameter
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial(params, user_attrs=TrialRecord(reference="baseline").user_attrs())
    trial = study.ask()
    config = suggest(trial, space)
    assert config["bits"] == 32 and config["sparsity"] == 0.0 and config["num_experts"] == 1
    # an ordinary trial never gets 32 bits from a space without it
    study.tell(trial, [0.9, 1.0, 1.0])
    for _ in range(5):
        other = study.ask()
        assert suggest(other, space)["bits"] in space.bits
        study.tell(other, [0.9, 1.0, 1.0])


def test_expert_init_is_a_parameter_only_when_there_is_a_choice() -> None:
    """The default one-choice space adds no parameter (studies made before it still compare equal)."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert "expert_init" not in suggest(study.ask(), parse_config({}).space)
    two = {"teachers": 2}, {"kd_targets": "ensemble"}
    cfg = parse_config(
        {
            "baseline": two[0],
            "trial": two[1],
            "export": two[1],
            "space": {"expert_init": ["teachers", "copies"]},
        }
    )
    trial = study.ask()
    assert suggest(trial, cfg.space)["expert_init"] in ("teachers", "copies")
    assert isinstance(trial.distributions["expert_init"], optuna.distributions.CategoricalDistribution)
    assert baseline_params(cfg.space)["expert_init"] == "teachers"


def test_views_are_a_parameter_only_when_there_is_a_choice() -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert "views" not in suggest(study.ask(), parse_config({}).space)
    cfg = parse_config({"space": {"views": [2, 1, 4]}})
    trial = study.ask()
    assert suggest(trial, cfg.space)["views"] in (1, 2, 4)
    assert isinstance(trial.distributions["views"], optuna.distributions.CategoricalDistribution)
    assert baseline_params(cfg.space)["views"] == 1  # the reference point: one plain pass


def test_blocks_removed_is_a_parameter_only_when_searched() -> None:
    """A space without ``blocks_removed`` adds no parameter; with it, an ordered integer, and 0 for the reference."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert "blocks_removed" not in suggest(study.ask(), parse_config({}).space)
    assert "blocks_removed" not in baseline_params(parse_config({}).space)
    cfg = parse_config({"space": {"blocks_removed": {"low": 1, "high": 6}}})
    trial = study.ask()
    assert 1 <= suggest(trial, cfg.space)["blocks_removed"] <= 6
    assert isinstance(trial.distributions["blocks_removed"], optuna.distributions.IntDistribution)
    assert baseline_params(cfg.space)["blocks_removed"] == 0  # the reference keeps every block


def test_expert_training_is_a_parameter_only_when_there_is_a_choice() -> None:
    """The default (joint only) adds no parameter; a choice is categorical and reaches the pipelines' config."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert "expert_training" not in suggest(study.ask(), parse_config({}).space)
    assert "expert_training" not in baseline_params(parse_config({}).space)
    cfg = parse_config({"space": {"expert_training": ["joint", "group"]}})
    trial = study.ask()
    params = suggest(trial, cfg.space)
    assert params["expert_training"] in ("joint", "group")
    assert isinstance(trial.distributions["expert_training"], optuna.distributions.CategoricalDistribution)
    assert hybrid_config(params, cfg.model).moe.expert_training == params["expert_training"]
    assert hybrid_config({**params, "expert_training": "group"}, cfg.model).moe.expert_training == "group"
    del params["expert_training"]
    assert hybrid_config(params, cfg.model).moe.expert_training == "joint"  # a study without it: joint
    assert baseline_params(cfg.space)["expert_training"] == "joint"


def test_block_ranking_is_a_parameter_only_when_there_is_a_choice_and_latency_reads_the_shares() -> None:
    """The default (output only) adds no parameter; 'latency' hands the study's block shares to the depth
    config, asked for only then; a ranking the pipelines lack is refused with the field named."""
    import pytest

    from pipelines.errors import ConfigError

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    assert "block_ranking" not in suggest(study.ask(), parse_config({}).space)
    cfg = parse_config(
        {"space": {"blocks_removed": {"low": 0, "high": 6}, "block_ranking": ["output", "latency"]}}
    )
    trial = study.ask()
    params = suggest(trial, cfg.space)
    assert params["block_ranking"] in ("output", "latency")
    assert baseline_params(cfg.space)["block_ranking"] == "output"
    asked = []

    def shares() -> dict[str, float]:
        asked.append(True)
        return {"layers.0.1": 0.17, "layers.2.2": 0.05}

    depth = hybrid_config({**params, "block_ranking": "latency"}, cfg.model, shares).depth
    assert depth.ranking == "latency" and depth.block_time == (("layers.0.1", 0.17), ("layers.2.2", 0.05))
    depth = hybrid_config({**params, "block_ranking": "output"}, cfg.model, shares).depth
    assert depth.ranking == "output" and depth.block_time == () and len(asked) == 1
    with pytest.raises(ConfigError, match=r"space.block_ranking.*'fast'"):
        parse_config({"space": {"block_ranking": ["fast"]}})
