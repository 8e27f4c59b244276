"""The search-space schema: defaults validate, bad input fails with the field, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from pipelines.errors import ConfigError
from search.record import TrialRecord
from search.space import SearchConfig, baseline_params, dump_config, load_config, parse_config, suggest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["bloodmnist.yaml", "tiny.yaml"])
def test_shipped_spaces_validate(name: str) -> None:
    cfg = load_config(REPO / "search_spaces" / name)
    assert isinstance(cfg, SearchConfig)
    assert cfg.study.trials >= 1


def test_dump_round_trips() -> None:
    cfg = load_config(REPO / "search_spaces" / "bloodmnist.yaml")
    import yaml

    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ({"data": {"dataset": "bloodmnst"}}, ["data.dataset", "bloodmnst", "bloodmnist"]),
        ({"model": {"arch": "vgg"}}, ["model.arch", "vgg", "resnet20"]),
        ({"space": {"pruner": ["l1", "taylorr"]}}, ["space.pruner", "taylorr", "fpgm"]),
        ({"study": {"sampler": {"name": "cmaes2"}}}, ["study.sampler.name", "cmaes2", "nsga2"]),
        ({"space": {"sparsity": {"low": 0.2, "high": 0.99}}}, ["space.sparsity.high", "0.99", "0.95"]),
        ({"space": {"bits": [4, 9]}}, ["space.bits", "9", "8"]),
        ({"space": {"num_experts": {"low": 0, "high": 2}}}, ["space.num_experts.low", "0"]),
        (
            {"space": {"top_k": {"low": 3, "high": 3}, "num_experts": {"low": 1, "high": 2}}},
            ["top_k", "3", "num_experts"],
        ),
        ({"space": {"gate_size": [0]}}, ["space.gate_size", "0"]),
        ({"study": {"trials": 0}}, ["study.trials", "0"]),
        ({"study": {"trials": -3}}, ["study.trials", "-3"]),
        ({"space": {"sparsity": {"low": 0.6, "high": 0.3}}}, ["space.sparsity", "swap"]),
        ({"trial": {"kd_alpha": 1.5}}, ["trial.kd_alpha", "1.5"]),
        ({"export": {"augment": "rotate"}}, ["export.augment", "rotate", "d4"]),
        ({"baseline": {"augment": "flip"}}, ["baseline.augment", "flip", "flips"]),
        ({"baseline": {"precision": "fp16"}}, ["baseline.precision", "fp16", "bf16"]),
        ({"trial": {"precision": "int8"}}, ["trial.precision", "int8", "fp32"]),
        ({"trial": {"kd_targets": "offline"}}, ["trial.kd_targets", "offline", "ensemble"]),
        ({"baseline": {"teachers": 0}}, ["baseline.teachers", "0", "[1, 8]"]),
        (  # several teachers are distilled from through their precomputed, averaged logits only
            {"baseline": {"teachers": 2}, "trial": {"kd_targets": "ensemble"}},
            ["export.kd_targets", "'online'", "baseline.teachers", "kd_targets: ensemble"],
        ),
        ({"space": {"expert_init": ["clones"]}}, ["space.expert_init", "clones", "copies, teachers"]),
        (  # one teacher cannot give experts different origins
            {"space": {"expert_init": ["copies", "teachers"]}},
            ["space.expert_init", "baseline.teachers is 1", "baseline.teachers: 2"],
        ),
        ({"space": {"views": [3]}}, ["space.views", "3", "1, 2, 4, 8"]),
        (  # flips trains on 4 of the 8 symmetries
            {"space": {"views": [1, 8]}, "trial": {"augment": "d4"}, "export": {"augment": "flips"}},
            ["space.views", "8", "export.augment: flips covers 4", "export.augment: d4"],
        ),
        ({"constraints": {"max_latency_ms": -1}}, ["constraints.max_latency_ms", "-1"]),
        ({"spcae": {}}, ["spcae", "unknown key", "space"]),
        ({"space": {"bitz": [4]}}, ["space.bitz", "unknown key", "bits"]),
        ({"study": {"trials": "many"}}, ["study.trials", "many", "integer"]),
    ],
)
def test_bad_values_name_field_value_and_fix(mapping: dict, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(mapping)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("study:\n  name: x\n  trials: [1, 2\nspace: {}\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line \d+"):
        load_config(path)


def test_missing_space_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


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


def test_replace_revalidates() -> None:
    cfg = parse_config({})
    assert cfg.replace(study={"trials": 3}).study.trials == 3
    with pytest.raises(ConfigError, match="study.trials"):
        cfg.replace(study={"trials": 0})


def test_unknown_quantizer_and_routing_are_named() -> None:
    with pytest.raises(ConfigError, match=r"space.quantizer: unknown value 'lsq'. Valid values: ptq, qat"):
        parse_config({"space": {"quantizer": ["lsq"]}})
    with pytest.raises(ConfigError, match=r"space.routing: unknown value 'random'"):
        parse_config({"space": {"routing": ["random"]}})


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
