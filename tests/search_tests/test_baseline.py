"""search.baseline: the teacher's cache key follows its recipe and its model spec; an interrupted teacher resumes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from search.baseline import baseline_key, teacher_recipe
from search.config import dump_config, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DATA = SimpleNamespace(name="bloodmnist", fingerprint="0" * 64)  # what a key reads of a Dataset


def test_key_changes_with_the_recipe_only() -> None:
    default = parse_config({})
    assert baseline_key(default, DATA) == baseline_key(parse_config({"study": {"trials": 99}}), DATA)
    keys = {
        baseline_key(parse_config({"baseline": change}), DATA)
        for change in ({}, {"augment": "d4"}, {"augment": "none"}, {"epochs": 3}, {"seed": 1})
    }
    assert len(keys) == 5
    assert teacher_recipe(parse_config({"baseline": {"augment": "d4"}})).augment == "d4"


def test_the_key_covers_the_whole_model_spec_and_a_checkpoint_by_content(tmp_path: Path) -> None:
    """Pinned: an accidental change of the key would retrain every user's teachers. bf16 and d4 are other
    recipes (other numerics): other keys. Every field of the model spec, and a checkpoint's bytes, count."""
    mapping = yaml.safe_load(dump_config(load_config(REPO / "search_spaces" / "bloodmnist.yaml")))
    mapping["baseline"].update(epochs=40, precision="fp32", augment="flips")
    pinned = baseline_key(parse_config(mapping), DATA)
    assert pinned == baseline_key(parse_config(mapping), DATA) and pinned.startswith("bloodmnist-resnet20-")
    mapping["baseline"]["augment"] = "d4"
    d4 = baseline_key(parse_config(mapping), DATA)
    mapping["baseline"]["precision"] = "bf16"
    assert len({pinned, d4, baseline_key(parse_config(mapping), DATA)}) == 3
    keys = {
        baseline_key(parse_config({"model": model}), DATA)
        for model in (
            {},
            {"width": 0.5},
            {"exclude": ["fc"]},
            {"arch": "torchvision:resnet18"},
            {"arch": "torchvision:resnet18", "small_input": False},
            {"arch": "torchvision:mobilenet_v2", "kwargs": {"width_mult": 0.5}},
        )
    }
    assert len(keys) == 6
    assert all("/" not in key and ":" not in key for key in keys)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"one")
    cfg = parse_config({"model": {"checkpoint": str(weights)}})
    before = baseline_key(cfg, DATA)
    weights.write_bytes(b"two")
    assert baseline_key(cfg, DATA) != before


def test_the_key_covers_the_data_content_and_the_cache_format(monkeypatch) -> None:
    """Other pixels under the same file name (e.g. images of another size) must not reuse a teacher."""
    import search.baseline as baseline

    cfg = parse_config({})
    key = baseline_key(cfg, DATA)
    assert baseline_key(cfg, SimpleNamespace(name="bloodmnist", fingerprint="1" * 64)) != key
    monkeypatch.setattr(baseline, "CACHE_FORMAT", baseline.CACHE_FORMAT + 1)
    assert baseline_key(cfg, DATA) != key


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
    caches = {path.name for path in (tmp_path / "results" / "baselines").iterdir()}
    assert len(caches - {"ensembles", "targets", "probes"}) == 2  # the two teachers, plus shared caches


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

    def interrupted(model, data, train_cfg, on_step=None, checkpoint=None, **progress):
        def stop(done: int, total: int) -> None:
            if done > total // 2 + 1:  # past the first epoch's checkpoint
                raise KeyboardInterrupt

        return train(model, data, train_cfg, on_step=stop, checkpoint=checkpoint, **progress)

    monkeypatch.setattr(baseline, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        get_baseline(cfg, tiny_data, tmp_path / "resumed")
    folder = tmp_path / "resumed" / "baselines" / baseline_key(cfg, tiny_data)
    assert (folder / "progress.pt").exists() and not (folder / "baseline.json").exists()
    monkeypatch.setattr(baseline, "train", train)
    resumed, record = get_baseline(cfg, tiny_data, tmp_path / "resumed")
    assert record["resumed_at_step"] > 0 and not (folder / "progress.pt").exists()
    whole, _ = get_baseline(cfg, tiny_data, tmp_path / "whole")
    expected = whole.state_dict()
    assert all(torch.allclose(value, expected[key], atol=1e-6) for key, value in resumed.state_dict().items())
