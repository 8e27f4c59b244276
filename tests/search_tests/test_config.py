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
        ({"space": {"expert_training": ["solo"]}}, ["space.expert_training", "solo", "group, joint"]),
        ({"space": {"blocks_removed": {"low": -1, "high": 2}}}, ["space.blocks_removed.low", "-1", ">= 0"]),
        ({"space": {"blocks_removed": {"low": 3, "high": 1}}}, ["space.blocks_removed", "swap"]),
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


# ------------------------------------------------------------------------ caught up front (issue 28)

INTERNAL_NAMES = ("train.", "budget.", "prune.", "quantize.", "moe.")  # the pipelines' fields, never shown


def _refused(mapping: dict, expected: list[str]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(mapping)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not message.startswith(INTERNAL_NAMES), message
    return message


@pytest.mark.parametrize(
    "name", ["..", ".", ".hidden", "a/b", "../escape", "a\\b", "x y", "a:b", "caf\u00e9", "", "n" * 101]
)
def test_a_study_name_is_one_safe_folder_under_the_results_root(name: str) -> None:
    message = _refused(
        {"study": {"name": name}}, ["study.name", repr(name), "letters, digits, '-', '_' or '.'"]
    )
    assert "results root" in message
    if len(name) > 100:
        assert "101 characters" in message and "--storage" not in message


def test_a_study_name_of_safe_characters_is_accepted() -> None:
    for name in ("bloodmnist-resnet20", "a.b_c", "n" * 100, "7"):
        assert parse_config({"study": {"name": name}}).study.name == name


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        (
            {"name": "tpe", "options": {"n_startup_trials": "abc"}},
            ["study.sampler.options.n_startup_trials", "'abc'", "a whole number", "n_startup_trials: 10"],
        ),
        (
            {"name": "tpe", "options": {"multivariate": "yes"}},
            ["study.sampler.options.multivariate", "'yes'", "true or false"],
        ),
        (
            {"name": "tpe", "options": {"prior_weight": "heavy"}},
            ["study.sampler.options.prior_weight", "'heavy'", "a number"],
        ),
        (
            {"name": "tpe", "options": {"n_startup": 5}},
            ["study.sampler.options.n_startup", "unknown option of TPESampler", "n_startup_trials"],
        ),
        (
            {"name": "nsga2", "options": {"n_startup_trials": 5}},
            ["study.sampler.options.n_startup_trials", "NSGAIISampler", "population_size"],
        ),
        (
            {"name": "random", "options": {"n_startup_trials": 5}},
            ["RandomSampler", "takes no options", "remove"],
        ),
        (
            {"name": "tpe", "options": {"gamma": 0.25}},
            ["study.sampler.options.gamma", "Python object", "Remove the option"],
        ),
        (
            {"name": "nsga2", "options": {"population_size": 1}},
            ["study.sampler.options", "'population_size': 1", "greater than or equal to 2", "Fix"],
        ),
        (
            {"name": "nsga2", "options": {"crossover_prob": 2.0}},
            ["study.sampler.options", "crossover_prob", "[0.0, 1.0]"],
        ),
        ({"name": "tpe", "options": {"n_startup_trials": -1}}, ["n_startup_trials", "-1", ">= 0"]),
        ({"name": "tpe", "options": {"n_ei_candidates": 0}}, ["n_ei_candidates", "0", "> 0", "default 24"]),
        ({"name": "gp", "options": {"n_startup_trials": -2}}, ["n_startup_trials", "-2", ">= 0"]),
        ({"name": "tpe", "options": {"seed": 3}}, ["study.sampler.options.seed", "study.sampler.seed"]),
        ({"name": "tpe", "seed": -1}, ["study.sampler.seed", "-1", "[0, 2147483647]"]),
        ({"name": "random", "seed": 2**40}, ["study.sampler.seed", str(2**40), "[0, 2147483647]"]),
        ({"name": "tpe", "seed": 1.5}, ["study.sampler.seed", "1.5", "integer"]),
    ],
)
def test_sampler_options_are_checked_against_the_sampler(sampler: dict, expected: list[str]) -> None:
    _refused({"study": {"sampler": sampler}}, expected)


def test_valid_sampler_options_pass() -> None:
    cfg = parse_config(
        {"study": {"sampler": {"name": "tpe", "options": {"n_startup_trials": 4, "multivariate": True}}}}
    )
    assert cfg.study.sampler.options == {"n_startup_trials": 4, "multivariate": True}
    assert parse_config({"study": {"sampler": {"name": "nsga2", "options": {"population_size": 8}}}})


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        # a step that is zero, negative or wider than its range
        ({"space": {"sparsity": {"low": 0.3, "high": 0.7, "step": 0}}}, ["space.sparsity.step", "0", "> 0"]),
        ({"space": {"sparsity": {"low": 0.3, "high": 0.7, "step": -0.1}}}, ["space.sparsity.step", "-0.1"]),
        (
            {"space": {"sparsity": {"low": 0.3, "high": 0.7, "step": 0.5}}},
            ["space.sparsity.step", "0.5", "0.4"],
        ),
        (
            {"space": {"num_experts": {"low": 1, "high": 4, "step": 0}}},
            ["space.num_experts.step", "0", ">= 1"],
        ),
        ({"space": {"top_k": {"low": 1, "high": 2, "step": -1}}}, ["space.top_k.step", "-1", ">= 1"]),
        (
            {"space": {"num_experts": {"low": 1, "high": 2, "step": 1.5}}},
            ["space.num_experts.step", "integer"],
        ),
        # low > high, in every range
        ({"space": {"num_experts": {"low": 3, "high": 1}}}, ["space.num_experts", "low 3 > high 1", "swap"]),
        ({"space": {"top_k": {"low": 2, "high": 1}}}, ["space.top_k", "low 2 > high 1", "swap"]),
        # not-a-number and infinity wherever a number is expected
        (
            {"space": {"sparsity": {"low": 0.3, "high": 0.7, "step": float("nan")}}},
            ["space.sparsity.step", "nan"],
        ),
        ({"space": {"sparsity": {"low": float("-inf"), "high": 0.7}}}, ["space.sparsity.low", "-inf"]),
        ({"baseline": {"lr": float("nan")}}, ["baseline.lr", "nan", "finite number"]),
        ({"trial": {"kd_temperature": float("inf")}}, ["trial.kd_temperature", "inf", "finite number"]),
        ({"export": {"finetune_epochs": float("inf")}}, ["export.finetune_epochs", "inf"]),
        ({"constraints": {"max_latency_ms": float("nan")}}, ["constraints.max_latency_ms", "nan"]),
        ({"constraints": {"min_accuracy": float("-inf")}}, ["constraints.min_accuracy", "-inf"]),
        ({"constraints": {"max_routing_share": 0}}, ["constraints.max_routing_share", "0", "(0, 1]", "null"]),
        ({"constraints": {"max_routing_share": 1.5}}, ["constraints.max_routing_share", "1.5", "(0, 1]"]),
        ({"constraints": {"max_latency_per_mac": 0}}, ["constraints.max_latency_per_mac", "0", "(0, 100]"]),
        (
            {"constraints": {"max_latency_per_mac": 1.5}, "measure": {"throughput_batch": None}},
            ["constraints.max_latency_per_mac", "1.5", "measure.throughput_batch is null", "(e.g. 64)"],
        ),
        (
            {"constraints": {"max_latency_per_mac": 1.5}, "measure": {"latency": "predicted"}},
            ["constraints.max_latency_per_mac", "'predicted'", "measure.latency: measured"],
        ),
        ({"measure": {"throughput_batch": 1}}, ["measure.throughput_batch", "1"]),
        ({"measure": {"throughput_batch": 4096}}, ["measure.throughput_batch", "4096"]),
        ({"model": {"width": float("nan")}}, ["model.width", "nan"]),
        ({"model": {"kwargs": {"dropout": float("inf")}}}, ["model.kwargs.dropout", "inf"]),
        ({"study": {"timeout_minutes": float("inf")}}, ["study.timeout_minutes", "inf", "null"]),
        # zero or negative batch sizes, timeouts, seeds
        ({"baseline": {"batch_size": 0}}, ["baseline.batch_size", "0", ">= 2"]),
        ({"trial": {"batch_size": -4}}, ["trial.batch_size", "-4", ">= 2"]),
        ({"export": {"batch_size": 1}}, ["export.batch_size", "1", ">= 2"]),
        ({"study": {"timeout_minutes": -1}}, ["study.timeout_minutes", "-1", "> 0", "null"]),
        ({"study": {"timeout_minutes": 0}}, ["study.timeout_minutes", "0", "> 0"]),
        ({"seed": -5}, ["seed", "-5", "[0, 2147483647]"]),
        ({"baseline": {"seed": -1}}, ["baseline.seed", "-1", "[0, 2147483647]"]),
        ({"study": {"trials": 0}}, ["study.trials", "0", "e.g. 8"]),
        # the user's section names, never the pipelines' (train.lr, budget.moe_epochs)
        ({"baseline": {"lr": 100}}, ["baseline.lr", "100", "[1e-06, 10.0]"]),
        ({"baseline": {"epochs": 0}}, ["baseline.epochs", "0", "> 0"]),
        ({"baseline": {"weight_decay": -1}}, ["baseline.weight_decay", "-1", ">= 0"]),
        ({"trial": {"label_smoothing": 1.0}}, ["trial.label_smoothing", "1.0", "[0, 1)"]),
        ({"export": {"gate_epochs": -1}}, ["export.gate_epochs", "-1"]),
    ],
)
def test_late_failures_are_caught_when_the_config_is_parsed(mapping: dict, expected: list[str]) -> None:
    _refused(mapping, expected)


def _space_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "space.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("text", ["", "\n\n", "# a comment\n# another\n", "---\n", "{}\n"])
def test_an_empty_space_file_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_space_file(tmp_path, text))
    message = str(caught.value)
    assert "--space" in message and "empty" in message and "study:" in message and "space:" in message


@pytest.mark.parametrize(
    ("text", "missing"), [("study: {name: x}\n", "space"), ("space: {bits: [8]}\n", "study")]
)
def test_a_space_file_needs_study_and_space(tmp_path: Path, text: str, missing: str) -> None:
    with pytest.raises(ConfigError, match=f"no `{missing}:` section.*search_spaces/tiny.yaml"):
        load_config(_space_file(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("study:\n  name: a\n  name: b\nspace: {}\n", "name", 3, 2),
        ("study: {name: a}\nspace: {}\nspace: {bits: [4]}\n", "space", 3, 2),
        ("study: {name: a, trials: 2, trials: 3}\nspace: {}\n", "trials", 1, 1),
        (
            "study: {name: a}\nspace:\n  sparsity: {low: 0.1, high: 0.5}\n  sparsity: {low: 0.2, high: 0.6}\n",
            "sparsity",
            4,
            3,
        ),
    ],
)
def test_a_key_written_twice_is_refused(tmp_path: Path, text: str, key: str, line: int, first: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_space_file(tmp_path, text))
    message = str(caught.value)
    assert f"key {key!r} is written twice" in message and f"line {line}" in message
    assert f"first at line {first}" in message and "remove one" in message


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    """``<<: *defaults`` followed by one of its keys is ordinary YAML, not a key written twice."""
    path = _space_file(
        tmp_path, "study: {name: a}\nspace: {}\ntrial: {<<: {batch_size: 64}, batch_size: 32}\n"
    )
    assert load_config(path).trial.batch_size == 32


@pytest.mark.parametrize("kind", ["folder", "binary", "nul"])
def test_a_folder_or_binary_file_as_space_is_named(tmp_path: Path, kind: str) -> None:
    if kind == "folder":
        path = tmp_path
    elif kind == "binary":
        path = _space_file(tmp_path, bytes(range(256)) * 4)
    else:
        path = _space_file(tmp_path, b"study:\x00\x01\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and ("--space" in message or "malformed YAML" in message)
    assert "search_spaces/" in message or "Fix the file" in message
