"""search.setup: data, teachers (an ensemble, trained side by side) and the trial context; a search on a
torchvision model, and one that starts from the user's trained weights instead of training a teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from optuna.trial import TrialState

from search.baseline import baseline_key, load_teacher
from search.config import parse_config
from search.record import TrialRecord
from search.setup import get_teachers, load_data, trial_context

REPO = Path(__file__).resolve().parents[2]


def test_a_teacher_ensemble_caches_each_member_and_records_its_accuracy(
    tiny_data, tmp_path: Path, monkeypatch
) -> None:
    ensemble = {"kd_targets": "ensemble"}
    cfg = parse_config(
        {
            "model": {"arch": "resnet8", "width": 0.25},
            "baseline": {"epochs": 0.5, "teachers": 2},
            "trial": ensemble,
            "export": ensemble,
            "measure": {"latency_repeats": 2},
        }
    )
    teachers, record = get_teachers(cfg, tiny_data, tmp_path)
    assert len(teachers) == 2
    # member 0 is the one-teacher study's teacher (same key); member 1 is the next seed, cached apart
    assert record["key"] == baseline_key(cfg, tiny_data)
    members = record["ensemble"]["members"]
    assert members[0] == baseline_key(cfg, tiny_data) and members[1] != members[0]
    assert all((tmp_path / "baselines" / key / "baseline.json").exists() for key in members)
    first, second = (next(t.parameters()) for t in teachers)
    assert not torch.equal(first, second)  # different seeds, different weights
    assert 0 <= record["ensemble"]["test_accuracy"] <= 1
    assert record["ensemble"]["macs"] == 2 * record["macs"]
    # loading again trains nothing (same weights) and evaluates nothing: the ensemble's record is kept
    assert len(list((tmp_path / "baselines" / "ensembles").glob("*.json"))) == 1
    monkeypatch.setattr("search.setup.predict_logits", None)
    again, again_record = get_teachers(cfg, tiny_data, tmp_path)
    assert torch.equal(next(again[1].parameters()), second)
    assert again_record["ensemble"] == record["ensemble"]
    monkeypatch.undo()
    one, single_record = get_teachers(
        parse_config(
            {
                "model": {"arch": "resnet8", "width": 0.25},
                "baseline": {"epochs": 0.5},
                "measure": {"latency_repeats": 2},
            }
        ),
        tiny_data,
        tmp_path,
    )
    assert len(one) == 1 and "ensemble" not in single_record


def test_teachers_trained_side_by_side_equal_those_trained_one_after_the_other(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`hycomp baseline --jobs 2` trains the missing members in two pinned processes: the same seeded
    training, so the same cached weights as one at a time; --jobs 0 is refused naming the flag."""
    from search.cli import main

    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["baseline"].update(epochs=0.5, teachers=2)
    mapping["export"]["kd_targets"] = "ensemble"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(mapping))
    folders = {}
    for jobs in (1, 2):
        work = tmp_path / f"jobs{jobs}"
        work.mkdir()
        monkeypatch.chdir(work)
        assert (
            main(["baseline", "--space", str(space), "--data-root", str(synthetic_root), "--jobs", str(jobs)])
            == 0
        )
        # the teachers' folders (beside them: the ensemble's kept record)
        folders[jobs] = sorted(
            path.parent for path in (work / "results" / "baselines").glob("*/baseline.json")
        )
    capsys.readouterr()
    assert [f.name for f in folders[1]] == [f.name for f in folders[2]] and len(folders[2]) == 2
    for one, two in zip(folders[1], folders[2], strict=True):
        first, second = load_teacher(one).state_dict(), load_teacher(two).state_dict()
        assert all(torch.equal(first[name], second[name]) for name in first)
    assert main(["baseline", "--space", str(space), "--data-root", str(synthetic_root), "--jobs", "0"]) == 2
    assert "--jobs: 0 must be >= 1" in capsys.readouterr().err


def _tiny(synthetic_root: Path, name: str, model: dict, trials: int = 2) -> dict:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["study"].update(name=name, trials=trials)
    mapping["data"]["root"] = str(synthetic_root)
    mapping["model"] = model
    mapping["baseline"]["epochs"] = 0.5
    mapping["space"].update(num_experts={"low": 1, "high": 2}, bits=[8])
    mapping["measure"]["latency_repeats"] = 2
    return mapping


def test_load_data_and_trial_context(tiny_data, synthetic_root: Path, tmp_path: Path) -> None:
    cfg = parse_config(_tiny(synthetic_root, "context", {"arch": "resnet8", "width": 0.25}))
    data = load_data(cfg)
    assert data.name == tiny_data.name and len(data.train) == len(tiny_data.train)
    context, record = trial_context(cfg, data, tmp_path / "context")
    assert context.study_folder == tmp_path / "context" and context.distill_from == [context.teacher]
    assert record["key"] == baseline_key(cfg, tiny_data) and record["source"] == "trained"
    assert (tmp_path / "baselines" / record["key"] / "baseline.json").exists()


@pytest.mark.slow
def test_a_search_on_a_torchvision_model(synthetic_root: Path, tmp_path: Path) -> None:
    """model.arch torchvision:... with small_input and builder kwargs: the teacher is built, trained, cached
    and rebuilt from its checkpoint; trials prune it (model.exclude honoured) and save MoEs that name it."""
    from search.study import run_search

    model = {
        "arch": "torchvision:mobilenet_v3_small",
        "small_input": True,
        "kwargs": {"width_mult": 0.25},
        "exclude": ["classifier"],
        "channel_multiple": 1,
    }
    cfg = parse_config(_tiny(synthetic_root, "torchvision", model))
    study = run_search(cfg, results=tmp_path, show_progress=False)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len([trial for trial in complete if not TrialRecord.of(trial).is_repeat]) == 2
    record = study.user_attrs["baseline"]
    assert record["model"]["arch"] == "torchvision:mobilenet_v3_small" and record["source"] == "trained"
    teacher = load_teacher(tmp_path / "baselines" / record["key"])
    assert teacher.features[0][0].stride == (1, 1)  # the small-input stem
    saved = sorted((tmp_path / "torchvision" / "trials").glob("trial_*/model.json"))
    assert saved
    description = json.loads(saved[0].read_text())["description"]
    assert description["model"]["arch"] == "torchvision:mobilenet_v3_small"
    assert description["model"]["exclude"] == ["classifier"]


@pytest.mark.slow
def test_a_search_starts_from_the_users_checkpoint(synthetic_root: Path, tmp_path: Path, tiny_data) -> None:
    """model.checkpoint: the teacher is the user's weights, evaluated and cached, not trained; its record
    says where it came from; the trials compress it."""
    from pipelines.models import ModelSpec
    from pipelines.train import TrainConfig, evaluate, train
    from search.study import run_search

    torch.manual_seed(0)
    trained = ModelSpec("resnet8", width=0.25).build(tiny_data.channels, tiny_data.num_classes, 28)
    train(trained, tiny_data.train, TrainConfig(epochs=1, batch_size=64, augment="none"))
    weights = tmp_path / "mine.pt"
    torch.save(trained.state_dict(), weights)
    mapping = _tiny(
        synthetic_root, "checkpoint", {"arch": "resnet8", "width": 0.25, "checkpoint": str(weights)}
    )
    mapping["trial"].update(kd_targets="online", augment="flips")
    mapping["study"]["trials"] = 1
    cfg = parse_config(mapping)
    study = run_search(cfg, results=tmp_path / "results", show_progress=False)
    record = study.user_attrs["baseline"]
    assert record["source"].startswith(f"checkpoint {weights} (sha256 ")
    assert record["train"] is None and record["train_seconds"] == 0.0
    assert record["val_accuracy"] == pytest.approx(evaluate(trained.eval(), tiny_data.val))
    teacher = load_teacher(tmp_path / "results" / "baselines" / record["key"])
    assert all(torch.equal(value, trained.state_dict()[key]) for key, value in teacher.state_dict().items())
    assert not (tmp_path / "results" / "baselines" / record["key"] / "progress.pt").exists()
    assert study.get_trials(states=(TrialState.COMPLETE,))
    # other weights at the same path: another teacher
    weights.write_bytes(b"")
    assert baseline_key(cfg, tiny_data) != record["key"]


def test_augment_auto_is_probed_once_per_dataset_and_resolved_everywhere(
    synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """`augment: auto` (the default) becomes the probe's group in baseline, trial and export; the probe's
    record is cached by the data's content, so workers and later commands reuse it without probing."""
    import search.setup as setup
    from search.setup import resolve_augment

    cfg = parse_config(
        {
            "data": {"dataset": "npz", "path": str(synthetic_root / "bloodmnist.npz")},
            "trial": {"augment": "d4"},
        }
    )
    assert (cfg.baseline.augment, cfg.trial.augment, cfg.export.augment) == ("auto", "d4", "auto")
    data = load_data(cfg)
    assert data.name == "bloodmnist"
    resolved, probe = resolve_augment(cfg, data, tmp_path)
    assert probe["augment"] in ("crop", "hflip", "flips", "d4") and "augment auto ->" in probe["summary"]
    assert resolved.baseline.augment == resolved.export.augment == probe["augment"]
    assert resolved.trial.augment == "d4"  # an explicit choice is kept
    cached = list((tmp_path / "baselines" / "probes").glob("*.json"))
    assert len(cached) == 1

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(setup, "choose_augment", no_probe)
    again, record = resolve_augment(cfg, data, tmp_path)
    assert again == resolved and record == probe
    cached[0].write_text("{broken")  # a damaged cache is probed again, not trusted
    with pytest.raises(AssertionError, match="probed again"):
        resolve_augment(cfg, data, tmp_path)
    explicit = parse_config(
        {"baseline": {"augment": "d4"}, "trial": {"augment": "d4"}, "export": {"augment": "d4"}}
    )
    assert resolve_augment(explicit, data, tmp_path) == (explicit, None)
