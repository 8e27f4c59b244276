"""The search configuration schema: defaults validate, bad input fails with the field as the user wrote it,
the value and the fix; the model section is a ModelSpec."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.models import ModelSpec
from search.config import SearchConfig, dump_config, load_config, parse_config, setup_fingerprint

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
        # ranges are checked by the pipelines' configs; the message names the user's field
        ({"baseline": {"lr": 0}}, ["baseline.lr", "0", "[1e-06, 10.0]"]),
        ({"export": {"subset": 0.001}}, ["export.subset", "0.001", "[0.01, 1]"]),
        ({"trial": {"qat_epochs": 0}}, ["trial.qat_epochs", "must be > 0"]),
        ({"trial": {"moe_epochs": 2000}}, ["trial.moe_epochs", "2000", "[0, 1000]"]),
        ({"model": {"channel_multiple": 0}}, ["model.channel_multiple", "0"]),
        ({"space": {"top_k": {"low": 1, "high": 17}}}, ["space.top_k.high", "17"]),
        ({"model": {"arch": "torchvision:resnet9000"}}, ["model.arch", "torchvision:resnet18"]),
        ({"model": {"arch": "torchvision:resnet18", "width": 0.5}}, ["model.width", "registry models only"]),
        ({"model": {"small_input": "maybe"}}, ["model.small_input", "maybe", "auto"]),
        ({"model": {"kwargs": {"width_mult": 0.5}}}, ["model.kwargs", "registry model", "model.width"]),
        ({"model": {"exclude": [""]}}, ["model.exclude"]),
        (
            {"model": {"checkpoint": "w.pt"}, "baseline": {"teachers": 2}},
            ["baseline.teachers", "model.checkpoint"],
        ),
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


def test_the_model_section_is_a_model_spec() -> None:
    cfg = parse_config(
        {
            "model": {
                "arch": "torchvision:mobilenet_v3_small",
                "small_input": True,
                "kwargs": {"width_mult": 0.5},
                "exclude": ["classifier"],
                "channel_multiple": 4,
            }
        }
    )
    assert cfg.model.spec == ModelSpec(
        "torchvision:mobilenet_v3_small",
        small_input=True,
        kwargs={"width_mult": 0.5},
        exclude=("classifier",),
    )
    assert cfg.model.channel_multiple == 4
    assert parse_config({"model": {"exclude": []}}).model.exclude == ()
    assert parse_config({"model": {"small_input": "auto"}}).model.spec.small_input == "auto"
    assert parse_config(cfg.to_dict()) == cfg  # round-trips through the YAML form


def test_a_checkpoint_counts_by_its_content(tmp_path: Path) -> None:
    """Same path, other weights: another setup (a cached teacher or model of the old weights is not reused)."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"first")
    cfg = parse_config({"model": {"checkpoint": str(weights)}})
    before = setup_fingerprint(cfg, "data")
    assert cfg.model.identity()["checkpoint_sha256"]
    weights.write_bytes(b"second")
    assert setup_fingerprint(cfg, "data") != before
    weights.unlink()
    with pytest.raises(ConfigError, match="model.checkpoint: .* does not exist"):
        setup_fingerprint(cfg, "data")


def test_the_setup_covers_the_data_content_and_not_its_location() -> None:
    cfg = parse_config({})
    assert setup_fingerprint(cfg, "pixels") != setup_fingerprint(cfg, "other pixels")
    moved = cfg.replace(data={"root": "/elsewhere"})
    assert setup_fingerprint(moved, "pixels") == setup_fingerprint(cfg, "pixels")
