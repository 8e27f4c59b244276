"""The objective: a configuration sampled again reuses the earlier result instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from search.cli import main
from search.objective import _same_config, _same_model

REPO = Path(__file__).resolve().parents[2]


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


def _study_with(*configs: dict) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for config in configs:
        study.add_trial(
            create_trial(
                values=[0.9, 1.0, 0.1],
                params={"pruner": config["pruner"]},
                distributions={"pruner": CategoricalDistribution(["l1", "l2"])},
                user_attrs={"config": config},
            )
        )
    return study


def test_same_config_finds_the_earlier_trial() -> None:
    study = _study_with(_config(pruner="l2"), _config())
    trial = study.ask()
    assert _same_config(trial, _config()).number == 1
    assert _same_config(trial, _config(sparsity=0.6)) is None
    assert _same_config(trial, _config(bits=4)) is None


def test_top_k_counts_only_through_its_clipped_value() -> None:
    """One expert with top_k 2 runs exactly as one expert with top_k 1."""
    study = _study_with(_config(num_experts=1, top_k=1, effective_top_k=1))
    trial = study.ask()
    assert _same_config(trial, _config(num_experts=1, top_k=2, effective_top_k=1)) is not None
    assert _same_config(trial, _config(num_experts=2, top_k=2, effective_top_k=2)) is None


def test_a_single_expert_ignores_what_only_a_gate_uses() -> None:
    """Without a gate, gate size, routing and expert origin change nothing: not worth a second trial."""
    single = _config(num_experts=1, effective_top_k=1)
    study = _study_with(single)
    trial = study.ask()
    assert _same_config(trial, {**single, "gate_size": 16, "routing": "learned", "expert_init": "teachers"})
    assert _same_config(trial, {**single, "sparsity": 0.6, "gate_size": 16}) is None
    two = _study_with(_config(expert_init="copies"))
    assert _same_config(two.ask(), _config(expert_init="teachers")) is None
    assert _same_config(two.ask(), _config(gate_size=16, expert_init="copies")) is None


def _one_point_space(folder: Path, data_root: Path, name: str, **space) -> Path:
    """tiny.yaml narrowed to one trained configuration (one sparsity, pruner, bit-width, a single expert),
    2 trials; ``space`` adds or overrides keys of ``space:``."""
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"].update(name=name, trials=2, enqueue_baseline=False)
    mapping["space"].update(
        sparsity={"low": 0.5, "high": 0.5},
        pruner=["l1"],
        bits=[8],
        num_experts={"low": 1, "high": 1},
        top_k={"low": 1, "high": 1},
        gate_size=[4],
        **space,
    )
    mapping["measure"]["latency_repeats"] = 2
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_views_change_the_configuration_but_not_the_model() -> None:
    """Test-time views are inference only: a trial that differs only in them is measured on the trained
    model of the earlier trial, not trained again (and not a repeat: its objectives differ)."""
    study = _study_with(_config(views=1))
    trial = study.ask()
    assert _same_config(trial, _config(views=2)) is None
    assert _same_model(trial, _config(views=2)).number == 0
    assert _same_model(trial, _config(views=2, bits=4)) is None
    assert _same_model(_study_with(_config()).ask(), _config(views=4)).number == 0  # older trials: no views


@pytest.mark.slow
def test_a_views_trial_measures_the_trained_model_again(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """Two configurations that differ in views only: one training; the trained model is queued with the other
    views value, and that trial re-measures it (twice or half the MACs of the same network), and the export
    of the 2-view trial runs the views."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "views", views=[1, 2])
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    folder = tmp_path / "results" / "views"
    study = optuna.load_study(study_name="views", storage=f"sqlite:///{folder / 'study.db'}")
    trials = [
        t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "duplicate_of" not in t.user_attrs
    ]
    by_views = {t.user_attrs["config"]["views"]: t for t in trials}
    assert sorted(by_views) == [1, 2]
    first, second = sorted(trials, key=lambda t: t.number)
    assert "model_of" not in first.user_attrs and second.user_attrs["model_of"] == first.number
    assert second.user_attrs["views_of"] == first.number  # queued by the first trial, not sampled
    assert "finetune" not in second.user_attrs["seconds"]  # measured, not trained
    assert by_views[2].user_attrs["mmacs"] == pytest.approx(2 * by_views[1].user_attrs["mmacs"], rel=1e-6)
    assert by_views[2].user_attrs["size_kb"] == pytest.approx(by_views[1].user_attrs["size_kb"])
    assert by_views[2].user_attrs["achieved_sparsity"] == by_views[1].user_attrs["achieved_sparsity"]
    number = by_views[2].number
    assert main(["export", str(folder), "--trial", str(number)]) == 0
    bundle = folder / "export" / f"trial_{number}" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["views"] == 2
    # both are candidates within a budget (the 2-view one is off the front: twice the MACs, no gain needed);
    # the full-budget retraining trains their shared model once and measures it with each views value
    out = folder / "export" / "best"
    command = [
        "export",
        str(folder),
        "--retrain",
        "--candidates",
        "2",
        "--max-mmacs",
        "1000",
        "--out",
        str(out),
    ]
    assert main(command) == 0
    candidates = folder / "export" / "candidates"
    records = {
        views: json.loads((candidates / f"trial_{trial.number}" / "candidate.json").read_text())
        for views, trial in by_views.items()
    }
    assert "finetune" in records[1]["seconds"] and "finetune" not in records[2]["seconds"]
    assert records[2]["mmacs"] == pytest.approx(2 * records[1]["mmacs"], rel=1e-6)
    assert records[2]["achieved_sparsity"] == records[1]["achieved_sparsity"]


@pytest.mark.slow
def test_a_repeated_configuration_is_not_trained_again(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys, caplog
) -> None:
    """A one-point space: later trials reuse the first's result and do not count toward the target; the
    search stops once the sampler has proposed the evaluated point MAX_REPEATS times; the front lists the
    point once; exporting a repeat uses the first trial's saved model."""
    from search.study import MAX_REPEATS

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "one-point")
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    assert "few new points left" in caplog.text
    assert f"1 completed trials (+{MAX_REPEATS} repeated" in capsys.readouterr().out

    folder = tmp_path / "results" / "one-point"
    study = optuna.load_study(study_name="one-point", storage=f"sqlite:///{folder / 'study.db'}")
    first, *repeats = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(repeats) == MAX_REPEATS and "duplicate_of" not in first.user_attrs
    second = repeats[0]
    assert all(trial.user_attrs["duplicate_of"] == first.number for trial in repeats)
    assert all(trial.values == first.values for trial in repeats)
    assert sorted(path.name for path in (folder / "trials").iterdir()) == [f"trial_{first.number}"]

    from search.pareto import front_table

    assert front_table(study)["trial"].tolist() == [first.number]
    assert main(["export", str(folder), "--trial", str(second.number)]) == 0
    assert (folder / "export" / f"trial_{second.number}" / "report.md").exists()


def _tiny_space(folder: Path, data_root: Path, name: str, trials: int) -> Path:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"].update(name=name, trials=trials)
    mapping["measure"]["latency_repeats"] = 2
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.mark.slow
def test_a_compute_budget_rejects_configurations_before_training(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """--max-mmacs: configurations whose estimated MACs break it are PRUNED before any training (the
    uncompressed reference among them); every completed trial is within the budget."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "budget", trials=2)
    assert main(["search", "--space", str(space), "--max-mmacs", "1.6", "--no-progress"]) == 0
    folder = tmp_path / "results" / "budget"
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{folder / 'study.db'}")
    rejected = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert rejected and rejected[0].user_attrs.get("reference"), "the 2.5-MMACs reference breaks a 1.6 budget"
    for trial in rejected:
        assert trial.user_attrs["fail_reason"].startswith("rejected before training: mmacs")
        assert "constraints.max_mmacs 1.6" in trial.user_attrs["fail_reason"]
        assert not (folder / "trials" / f"trial_{trial.number}").exists(), "nothing was trained"
    assert len([t for t in complete if "duplicate_of" not in t.user_attrs]) == 2
    assert all(
        t.values[1] <= 1.6 and t.constraints == {"mmacs": pytest.approx(t.values[1] - 1.6)} for t in complete
    )


@pytest.mark.slow
def test_an_unreachable_budget_stops_with_a_clear_message(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys
) -> None:
    from search.study import MAX_REJECTIONS

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "impossible", trials=2)
    assert main(["search", "--space", str(space), "--max-mmacs", "0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the last {MAX_REJECTIONS} sampled configurations were all rejected" in err
    assert "--max-mmacs" in err and "Traceback" not in err
    folder = tmp_path / "results" / "impossible"
    study = optuna.load_study(study_name="impossible", storage=f"sqlite:///{folder / 'study.db'}")
    assert not study.get_trials(states=(TrialState.COMPLETE,))
    assert not (folder / "trials").exists() or not any((folder / "trials").iterdir())


def test_ensemble_targets_are_computed_once_per_augment(tiny_data, tmp_path: Path) -> None:
    from pipelines.models import build_model
    from search.objective import TrialContext
    from search.space import Budget, parse_space

    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval()
    context = TrialContext(parse_space({}), tiny_data, teacher, tmp_path)
    assert context.training_data(Budget(kd_targets="online")) is tiny_data
    ensemble = context.training_data(Budget(kd_targets="ensemble", augment="d4"))
    assert ensemble.train.teacher_logits.shape == (len(tiny_data.train), tiny_data.num_classes)
    assert ensemble.val is tiny_data.val and tiny_data.train.teacher_logits is None  # data left as it was
    assert context.training_data(Budget(kd_targets="ensemble", augment="d4")) is ensemble  # cached
    flips = context.training_data(Budget(kd_targets="ensemble", augment="flips"))
    assert not torch.allclose(flips.train.teacher_logits, ensemble.train.teacher_logits)


def test_ensemble_targets_average_every_teacher(tiny_data, tmp_path: Path) -> None:
    from pipelines.models import build_model
    from pipelines.train import ensemble_logits
    from search.objective import TrialContext
    from search.space import Budget, parse_space

    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval())
    context = TrialContext(parse_space({}), tiny_data, teachers[0], tmp_path, distill_from=teachers)
    targets = context.training_data(Budget(kd_targets="ensemble", augment="flips")).train.teacher_logits
    each = [ensemble_logits(teacher, tiny_data.train, "flips") for teacher in teachers]
    assert torch.allclose(targets, (each[0] + each[1]) / 2, atol=1e-5)
    assert not torch.allclose(targets, each[0], atol=1e-3)
