"""``hycomp front --remeasure``: the front's models re-timed into a sidecar that keeps the search-time figures,
and front / export choosing on the new ones (the timing itself is faked: the test checks the bookkeeping)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from pipelines.timing import InterleavedStats, LatencyStats
from search import latency, remeasure
from search.cli import main
from search.config import dump_config, load_config
from search.latency import LATENCY_KEY, LatencyReference, reference_bundle
from search.objective import DIRECTIONS
from search.pareto import pick_trial
from search.record import RECORD_KEY, TrialRecord
from search.remeasure import SIDECAR, load_remeasured
from tests.helpers import recorded

REPO = Path(__file__).resolve().parents[2]
TEACHER_MS = 2.0
# trial: (val accuracy, search-time latency ms, quiet latency ms). Trial 2 is dominated by trial 1 at
# search time; once trial 1 is re-timed slower, trial 2 joins the front and is re-timed too.
POINTS = {0: (0.9, 1.0, 1.0), 1: (0.8, 0.5, 0.9), 2: (0.7, 0.6, 0.4)}


def _stats(median_ms: float) -> LatencyStats:
    return LatencyStats(median_ms, median_ms, median_ms, median_ms, 4, 10, 1, 1, "fake", {})


@pytest.fixture
def study_folder(tmp_path: Path, synthetic_root: Path, tiny_data) -> Path:
    """A study of three measured trials, each with a (shared, fp32) bundle, and its latency reference."""
    import torch

    from pipelines.deploy.bundle import deploy_moe
    from pipelines.models import build_model
    from pipelines.moe import MoEConfig, build_moe

    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(synthetic_root)
    mapping["measure"]["engine"] = "onnxruntime"
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(mapping))
    cfg = load_config(tmp_path / "space.yaml")
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(cfg))
    torch.manual_seed(0)
    moe = build_moe(build_model("resnet8", 3, 8, 0.25), 3, MoEConfig(1, 1, 4), 0)
    bundle = folder / "trials" / "trial_0" / "bundle"
    deploy_moe(moe, bundle, tiny_data.train.images[:8], int8=False)
    for number in POINTS:
        if number:
            shutil.copytree(bundle, folder / "trials" / f"trial_{number}" / "bundle")
    shutil.copytree(bundle, reference_bundle(folder))
    study = optuna.create_study(
        study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}", directions=list(DIRECTIONS)
    )
    study.set_user_attr(LATENCY_KEY, LatencyReference("onnxruntime", "1", 1, 1, 1.8, TEACHER_MS).to_dict())
    for accuracy, search_ms, _ in POINTS.values():
        record = TrialRecord.from_dict(recorded(config={"num_experts": 1})[RECORD_KEY], "trial")
        measured = replace(
            record.measurement,
            val_accuracy=accuracy,
            latency_ms=search_ms,
            latency_ratio=search_ms / TEACHER_MS,
        )
        study.add_trial(
            optuna.trial.create_trial(
                values=[accuracy, 1.0, search_ms],
                user_attrs=replace(record, measurement=measured).user_attrs(),
            )
        )
    return folder


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each trial's model times at its quiet latency of ``POINTS``; returns the trials timed, in order."""
    timed: list[int] = []

    def against_teacher(bundle, teacher, image, reference, *, rounds, calls_per_round, warmup=5):
        assert rounds == 4 and reference.engine == "onnxruntime" and image.shape == (1, 3, 28, 28)
        number = int(bundle.experts[0].path.parent.parent.name.removeprefix("trial_"))
        timed.append(number)
        ratio = POINTS[number][2] / TEACHER_MS
        stats = InterleavedStats(
            _stats(ratio * 2.2), _stats(2.2), ratio, ratio * 0.9, ratio, [ratio], rounds, calls_per_round
        )
        return stats, None

    monkeypatch.setattr(remeasure, "time_against_teacher", against_teacher)
    monkeypatch.setattr(remeasure, "time_quietly", lambda *args: _stats(2.1))
    return timed


def test_remeasure_writes_a_sidecar_that_keeps_the_search_time_figures(
    study_folder: Path, fake_timing: list[int], capsys
) -> None:
    before = {
        t.number: t.values
        for t in optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder / 'study.db'}").trials
    }
    assert main(["front", str(study_folder), "--remeasure", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    assert "search ms" in out and "quiet ms" in out and "x teacher" in out
    # trial 2 joined the front once trial 1 was re-timed slower: it was re-timed too, each trial once
    assert sorted(fake_timing) == [0, 1, 2] and fake_timing[-1] == 2
    sidecar = json.loads((study_folder / SIDECAR).read_text())
    assert sidecar["engine"] == "onnxruntime" and sidecar["teacher_quiet_median_ms"] == TEACHER_MS
    assert sidecar["teacher_now"]["median_ms"] == 2.1
    for number, (_, search_ms, quiet_ms) in POINTS.items():
        entry = sidecar["trials"][str(number)]
        assert entry["latency_ms"] == pytest.approx(quiet_ms)  # ratio x the study's quiet teacher
        assert entry["latency_ratio"] == pytest.approx(quiet_ms / TEACHER_MS)
        assert entry["search_time"]["latency_ms"] == search_ms  # provenance
        assert entry["search_time"]["latency_ratio"] == pytest.approx(search_ms / TEACHER_MS)
    retimed = load_remeasured(study_folder)
    assert {n: r.latency_ms for n, r in retimed.items()} == pytest.approx({0: 1.0, 1: 0.9, 2: 0.4})
    assert all(r.routing_share is None for r in retimed.values())  # single nets: no routing share
    # the study is as it was; the front files use the new figures
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder / 'study.db'}")
    assert {t.number: t.values for t in study.trials} == before
    front = pd.read_csv(study_folder / "front.csv")
    assert sorted(front["trial"]) == [0, 1, 2] and front["remeasured"].all()
    assert dict(zip(front["trial"], front["latency_ms"], strict=True)) == pytest.approx(
        {0: 1.0, 1: 0.9, 2: 0.4}
    )
    assert dict(zip(front["trial"], front["search_latency_ms"], strict=True)) == {0: 1.0, 1: 0.5, 2: 0.6}
    assert dict(zip(front["trial"], front["latency_ratio"], strict=True)) == pytest.approx(
        {0: 0.5, 1: 0.45, 2: 0.2}
    )


def test_front_and_export_choose_on_the_remeasured_latency(study_folder: Path, fake_timing, capsys) -> None:
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder / 'study.db'}")
    assert load_remeasured(study_folder) == {}
    assert pick_trial(study, policy="min-latency").trial == 1  # search time: trial 1 is fastest
    assert main(["front", str(study_folder), "--remeasure", "--rounds", "4"]) == 0
    capsys.readouterr()
    assert main(["front", str(study_folder)]) == 0  # no re-timing: the sidecar is read
    out = capsys.readouterr().out
    assert "re-timed quietly" in out and len(fake_timing) == 3
    assert pick_trial(study, policy="min-latency", latency=load_remeasured(study_folder)).trial == 2


def test_rounds_without_remeasure_and_a_foreign_sidecar_exit_2(study_folder: Path, capsys) -> None:
    assert main(["front", str(study_folder), "--rounds", "4"]) == 2
    assert "--remeasure" in capsys.readouterr().err
    (study_folder / SIDECAR).write_text(json.dumps({"format": 99}))
    assert main(["front", str(study_folder)]) == 2
    err = capsys.readouterr().err
    assert SIDECAR in err and "--remeasure" in err and "Traceback" not in err


def test_a_moe_kept_off_the_front_by_its_search_time_routing_share_is_re_timed(
    study_folder: Path, fake_timing: list[int], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Trial 3, a multi-expert model.onnx, is the most accurate but over max_routing_share at search time
    (0.20 > 0.10): infeasible, off the front. Quietly its share is 0.05: --remeasure times it, and it joins
    the front, its share and its constraint replaced; the search-time share is kept as provenance."""
    from pipelines.deploy.runtime import load_bundle
    from search.record import SINGLE_FILE

    shutil.copytree(study_folder / "trials" / "trial_0", study_folder / "trials" / "trial_3")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder / 'study.db'}")
    record = TrialRecord.from_dict(recorded(config={"num_experts": 2})[RECORD_KEY], "trial")
    measured = replace(
        record.measurement, val_accuracy=0.95, latency_ms=0.7, latency_ratio=0.35, routing_share=0.2,
        routing_share_of=SINGLE_FILE,
    )  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(
            values=[0.95, 1.0, 0.7],
            user_attrs=replace(record, measurement=measured).user_attrs(),
            system_attrs={"constraints:routing_share": 0.2 - 0.1},
        )
    )
    monkeypatch.setitem(POINTS, 3, (0.95, 0.7, 0.7))
    # the one file is timed like the bundle here (the fake reads the trial from its files' folder)
    monkeypatch.setattr(remeasure, "load_single_file", lambda folder, **kwargs: load_bundle(folder))
    shares = []
    monkeypatch.setattr(
        remeasure, "routing_share", lambda folder, image, **kwargs: shares.append(folder.parent.name) or 0.05
    )
    assert main(["front", str(study_folder)]) == 0
    capsys.readouterr()
    assert 3 not in set(pd.read_csv(study_folder / "front.csv")["trial"])  # infeasible at search time
    assert main(["front", str(study_folder), "--remeasure", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    assert 3 in fake_timing and shares == ["trial_3"]  # only the multi-expert model has a routing share
    assert load_remeasured(study_folder)[3].routing_share == 0.05
    sidecar = json.loads((study_folder / SIDECAR).read_text())
    assert sidecar["trials"]["3"]["search_time"]["routing_share"] == 0.2
    front = pd.read_csv(study_folder / "front.csv").set_index("trial")
    assert (
        3 in front.index and front.loc[3, "routing_share"] == pytest.approx(0.05) and front.loc[3, "feasible"]
    )
    assert "20.0%" in out and "5.0%" in out  # search-time and quiet shares side by side


def test_a_model_kept_off_the_front_by_its_search_time_latency_per_mac_is_re_timed(
    study_folder: Path, fake_timing: list[int], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Trial 3 is the most accurate, but at search time it ran x0.6 the teacher at batch 64 on 0.3 of its
    MACs: 2.0x, over max_latency_per_mac 1.5, off the front. Quietly it runs x0.36 (1.2x): --remeasure
    re-times it at the batch the search used, and it joins the front, the search-time figure kept."""
    shutil.copytree(study_folder / "trials" / "trial_0", study_folder / "trials" / "trial_3")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_folder / 'study.db'}")
    record = TrialRecord.from_dict(recorded(config={"num_experts": 1})[RECORD_KEY], "trial")
    measured = replace(
        record.measurement, val_accuracy=0.95, latency_ms=0.7, latency_ratio=0.35, macs_ratio=0.3,
        batch_latency_ratio=0.6, batch_latency={"batch": 64, "min_ms": 6.0, "median_ms": 6.5},
    )  # fmt: skip
    study.add_trial(
        optuna.trial.create_trial(
            values=[0.95, 1.0, 0.7],
            user_attrs=replace(record, measurement=measured).user_attrs(),
            system_attrs={"constraints:latency_per_mac": 0.6 / 0.3 - 1.5},
        )
    )
    monkeypatch.setitem(POINTS, 3, (0.95, 0.7, 0.7))
    batch_one = remeasure.time_against_teacher
    batches = []

    def against_teacher(bundle, teacher, image, reference, *, rounds, calls_per_round, warmup=5):
        if len(image) == 1:
            return batch_one(bundle, teacher, image, reference, rounds=4, calls_per_round=calls_per_round)
        batches.append(len(image))
        stats = InterleavedStats(_stats(7.2), _stats(20.0), 0.36, 0.35, 0.36, [0.36], rounds, calls_per_round)
        return stats, None

    monkeypatch.setattr(remeasure, "time_against_teacher", against_teacher)
    monkeypatch.setattr(latency, "time_against_teacher", against_teacher)  # under time_at_batch
    assert main(["front", str(study_folder)]) == 0
    capsys.readouterr()
    assert 3 not in set(pd.read_csv(study_folder / "front.csv")["trial"])  # infeasible at search time
    assert main(["front", str(study_folder), "--remeasure", "--rounds", "4"]) == 0
    out = capsys.readouterr().out
    assert 3 in fake_timing and batches == [64]  # the others were not timed at a batch by the search
    assert load_remeasured(study_folder)[3].latency_per_mac == pytest.approx(1.2)
    sidecar = json.loads((study_folder / SIDECAR).read_text())
    assert sidecar["trials"]["3"]["search_time"]["latency_per_mac"] == pytest.approx(2.0)
    front = pd.read_csv(study_folder / "front.csv").set_index("trial")
    assert 3 in front.index and front.loc[3, "feasible"]
    assert front.loc[3, "latency_per_mac"] == pytest.approx(1.2)
    assert "2.00x" in out and "1.20x" in out  # search-time and quiet side by side
