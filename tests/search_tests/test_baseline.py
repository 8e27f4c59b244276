"""search.baseline: the teacher's cache key follows its training recipe, and old keys stay valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search.baseline import baseline_key, get_teachers, teacher_recipe
from search.space import dump_config, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_key_changes_with_the_recipe_only() -> None:
    default = parse_config({})
    assert baseline_key(default) == baseline_key(parse_config({"study": {"trials": 99}}))
    keys = {
        baseline_key(parse_config({"baseline": change}))
        for change in ({}, {"augment": "d4"}, {"augment": "none"}, {"epochs": 3}, {"seed": 1})
    }
    assert len(keys) == 5
    assert teacher_recipe(parse_config({"baseline": {"augment": "d4"}})).augment == "d4"


def test_cached_teachers_keep_the_keys_they_were_cached_under() -> None:
    """The 40-epoch fp32 teachers (40 min a core) were cached before `baseline.augment` (crops + flips)
    and `baseline.precision` existed; their recipes are unchanged, so their keys must be too or every
    user retrains them. bf16 is another recipe (other numerics): another key."""
    mapping = yaml.safe_load(dump_config(load_config(REPO / "search_spaces" / "bloodmnist.yaml")))
    mapping["baseline"].update(epochs=40, precision="fp32", augment="flips")
    assert baseline_key(parse_config(mapping)) == "bloodmnist-resnet20-b9f99b96bc5b"
    mapping["baseline"]["augment"] = "d4"
    assert baseline_key(parse_config(mapping)) == "bloodmnist-resnet20-8c89f98a1366"
    mapping["baseline"]["precision"] = "bf16"
    assert baseline_key(parse_config(mapping)) != "bloodmnist-resnet20-8c89f98a1366"


def test_a_teacher_ensemble_caches_each_member_and_records_its_accuracy(tiny_data, tmp_path: Path) -> None:
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
    assert record["key"] == baseline_key(cfg)
    members = record["ensemble"]["members"]
    assert members[0] == baseline_key(cfg) and members[1] != members[0]
    assert all((tmp_path / "baselines" / key / "baseline.json").exists() for key in members)
    first, second = (next(t.parameters()) for t in teachers)
    assert not torch.equal(first, second)  # different seeds, different weights
    assert 0 <= record["ensemble"]["test_accuracy"] <= 1
    assert record["ensemble"]["macs"] == 2 * record["macs"]
    # loading again trains nothing: same weights
    again, _ = get_teachers(cfg, tiny_data, tmp_path)
    assert torch.equal(next(again[1].parameters()), second)
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


def test_the_baseline_command_trains_every_teacher_and_prints_the_ensemble(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import json

    from search.cli import main

    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["baseline"].update(epochs=0.5, teachers=2)
    mapping["export"]["kd_targets"] = "ensemble"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(mapping))
    monkeypatch.chdir(tmp_path)  # the teachers are cached under ./results/baselines
    assert main(["baseline", "--space", str(space), "--data-root", str(synthetic_root)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["ensemble"]["members"]) == 2 and 0 <= printed["ensemble"]["val_accuracy"] <= 1
    assert len(list((tmp_path / "results" / "baselines").iterdir())) == 2


def test_teachers_trained_side_by_side_equal_those_trained_one_after_the_other(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`hycomp baseline --jobs 2` trains the missing members in two pinned processes: the same seeded
    training, so the same cached weights as one at a time; --jobs 0 is refused naming the flag."""
    from search.baseline import load_teacher
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
        folders[jobs] = sorted((work / "results" / "baselines").iterdir())
    capsys.readouterr()
    assert [f.name for f in folders[1]] == [f.name for f in folders[2]] and len(folders[2]) == 2
    for one, two in zip(folders[1], folders[2], strict=True):
        first, second = load_teacher(one).state_dict(), load_teacher(two).state_dict()
        assert all(torch.equal(first[name], second[name]) for name in first)
    assert main(["baseline", "--space", str(space), "--data-root", str(synthetic_root), "--jobs", "0"]) == 2
    assert "--jobs: 0 must be >= 1" in capsys.readouterr().err


def test_an_interrupted_teacher_resumes_from_its_last_epoch(tiny_data, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C during the teacher (35 min on the defaults) keeps its finished epochs: the re-run resumes
    there, trains the same teacher as an uninterrupted run, and removes its progress file."""
    import search.baseline as baseline
    from pipelines.train import train
    from search.baseline import get_baseline

    cfg = parse_config(
        {
            "model": {"arch": "resnet8", "width": 0.25},
            "baseline": {"epochs": 2},
            "measure": {"latency_repeats": 2},
        }
    )

    def interrupted(model, data, train_cfg, on_step=None, checkpoint=None):
        def stop(done: int, total: int) -> None:
            if done > total // 2 + 1:  # past the first epoch's checkpoint
                raise KeyboardInterrupt

        return train(model, data, train_cfg, on_step=stop, checkpoint=checkpoint)

    monkeypatch.setattr(baseline, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        get_baseline(cfg, tiny_data, tmp_path / "resumed")
    folder = tmp_path / "resumed" / "baselines" / baseline_key(cfg)
    assert (folder / "progress.pt").exists() and not (folder / "baseline.json").exists()
    monkeypatch.setattr(baseline, "train", train)
    resumed, record = get_baseline(cfg, tiny_data, tmp_path / "resumed")
    assert record["resumed_at_step"] > 0 and not (folder / "progress.pt").exists()
    whole, _ = get_baseline(cfg, tiny_data, tmp_path / "whole")
    expected = whole.state_dict()
    assert all(torch.allclose(value, expected[key], atol=1e-6) for key, value in resumed.state_dict().items())
