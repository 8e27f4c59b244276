"""The shared-trunk layout in the search: a trial with layout shared runs end to end, and estimate_cost
agrees with what the trial measured."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from pipelines.hybrid import StageBudget, compress_hybrid
from pipelines.measure import count_macs, packed_size_bytes
from pipelines.models import build_model
from pipelines.train import TrainConfig
from search.cli import main
from search.config import ModelSettings
from search.evaluation import estimate_cost, hybrid_config
from search.record import TrialRecord

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_shared_layout_trial_runs_end_to_end(tmp_path: Path, synthetic_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(synthetic_root)
    mapping["study"].update(name="shared", trials=1, enqueue_baseline=False)
    mapping["space"].update(
        sparsity={"low": 0.5, "high": 0.5},
        pruner=["l1"],
        bits=[8],
        num_experts={"low": 2, "high": 2},
        top_k={"low": 1, "high": 1},
        gate_size=[4],
        layout=["shared"],
        split_at={"low": 2, "high": 2},
    )
    mapping["measure"]["latency_repeats"] = 2
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(mapping))
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    folder = tmp_path / "results" / "shared"
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{folder / 'study.db'}")
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    record = TrialRecord.of(trial)
    assert record.config["layout"] == "shared" and record.config["split_at"] == 2
    assert record.measurement.top1_agreement_with_torch >= 0.9
    bundles = list((folder / "trials").glob("*/bundle/manifest.json"))  # not the teacher's reference
    assert bundles and json.loads(bundles[0].read_text())["layout"] == "shared"


def test_estimate_cost_equals_the_measured_macs_and_size(tiny_data) -> None:
    """At 8 bits (first/last layers at 8 too) the estimate and the trained model's counts agree exactly."""
    torch.manual_seed(0)
    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.5).eval()
    params = {
        "sparsity": 0.5,
        "pruner": "l1",
        "bits": 8,
        "num_experts": 3,
        "top_k": 2,
        "gate_size": 4,
        "layout": "shared",
        "split_at": 1,
        "views": 2,
    }
    context = SimpleNamespace(
        cfg=SimpleNamespace(model=ModelSettings()), data=tiny_data, teacher=teacher, block_time=dict
    )
    estimate = estimate_cost(context, params)
    budget = StageBudget(0.1, 0.05, 0.1, 0.05, TrainConfig(batch_size=64, augment="none"))
    result = compress_hybrid(teacher, tiny_data, hybrid_config(params, ModelSettings()), budget)
    moe = result.moe
    macs = count_macs(moe, tiny_data.val.images)
    size = packed_size_bytes(moe, lambda name: result.bits_by_layer.get(name, 32), skip=moe.idle_parts)
    assert estimate["mmacs"] == pytest.approx(macs / 1e6, rel=1e-6)
    assert estimate["size_kb"] == pytest.approx(size / 1024, rel=1e-6)
