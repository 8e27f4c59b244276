"""The trial context of the torch side: distillation targets computed once per augment, over every teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.latency import LatencyReference


def test_ensemble_targets_are_computed_once_per_augment(tiny_data, tmp_path: Path) -> None:
    from pipelines.models import build_model
    from search.config import Budget, parse_config
    from search.evaluation import TrialContext

    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval()
    context = TrialContext(parse_config({}), tiny_data, teacher, tmp_path)
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
    from search.config import Budget, parse_config
    from search.evaluation import TrialContext

    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval())
    context = TrialContext(parse_config({}), tiny_data, teachers[0], tmp_path, distill_from=teachers)
    targets = context.training_data(Budget(kd_targets="ensemble", augment="flips")).train.teacher_logits
    each = [ensemble_logits(teacher, tiny_data.train, "flips") for teacher in teachers]
    assert torch.allclose(targets, (each[0] + each[1]) / 2, atol=1e-5)
    assert not torch.allclose(targets, each[0], atol=1e-3)


def test_a_context_with_teacher_keys_keeps_its_targets_beside_the_teachers(tiny_data, tmp_path: Path) -> None:
    from pipelines.models import build_model
    from search.config import Budget, parse_config
    from search.evaluation import TrialContext
    from search.targets import targets_path

    teacher = build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval()
    study = tmp_path / "study"
    context = TrialContext(parse_config({}), tiny_data, teacher, study, teacher_keys=("key",))
    targets = context.training_data(Budget(kd_targets="ensemble", augment="flips")).train.teacher_logits
    path = targets_path(("key",), "flips", tiny_data, tmp_path)
    assert path.exists() and torch.equal(torch.load(path, weights_only=True), targets)
    other = TrialContext(parse_config({}), tiny_data, teacher, study, teacher_keys=("key",))
    again = other.training_data(Budget(kd_targets="ensemble", augment="flips")).train.teacher_logits
    assert torch.equal(again, targets)


def test_a_trial_is_timed_against_the_teacher_and_scored_by_the_ratio(tiny_data, tmp_path: Path) -> None:
    from pipelines.models import ModelSpec, build_model
    from pipelines.moe import MoEConfig, build_moe, moe_description
    from search.config import parse_config
    from search.evaluation import TrialContext, measure
    from search.latency import deploy_reference, reference_bundle
    from search.model_cache import TrainedModel
    from search.record import Training, TrialRecord

    cfg = parse_config(
        {"model": {"arch": "resnet8", "width": 0.25}, "measure": {"latency_repeats": 6, "latency_rounds": 3}}
    )
    channels, classes = tiny_data.channels, tiny_data.num_classes
    teacher = build_model("resnet8", channels, classes, 0.25).eval()
    moe = build_moe(build_model("resnet8", channels, classes, 0.25), channels, MoEConfig(2, 1, 4), 0)
    description = moe_description(ModelSpec("resnet8", width=0.25), channels, classes, 28, moe, 4)
    training = Training(expert_params=10, achieved_sparsity=0.0, class_assignment=None, stage_val_accuracy={})
    model = TrainedModel(moe, {**description, "bits_by_layer": {}}, training, {})
    params = {"sparsity": 0.0, "pruner": "l1", "bits": 8, "num_experts": 2, "top_k": 1, "gate_size": 4}
    study = tmp_path / "study"
    deploy_reference(cfg, tiny_data, teacher, study)
    quiet = LatencyReference("onnxruntime", "x", 1, 1, teacher_min_ms=1.5, teacher_median_ms=2.0)
    context = TrialContext(cfg, tiny_data, teacher, study, latency=quiet)
    measured, _ = measure(context, params, model, tmp_path / "trial")
    assert measured.engine == "onnxruntime" and measured.precision == "int8"
    assert measured.latency_ms == pytest.approx(measured.latency_ratio * 2.0)  # ratio x the quiet teacher
    assert measured.latency_ratio_min > 0 and measured.latency_ratio > 0
    for stats in (measured.latency, measured.teacher_latency):  # the raw numbers of both, same rounds
        assert 0 < stats["min_ms"] <= stats["median_ms"] and stats["repeats"] == 6 and stats["batch"] == 1
    assert "onnxruntime" in measured.latency["backend"] and 0.0 <= measured.routing_share <= 1.0
    # also timed at measure.throughput_batch against the teacher at that batch, and put beside its MACs ratio
    for stats in (measured.batch_latency, measured.teacher_batch_latency):
        assert stats["batch"] == 64 and 0 < stats["min_ms"] <= stats["median_ms"]
    assert measured.macs_ratio == pytest.approx(measured.mmacs / context.teacher_mmacs)
    assert measured.latency_per_mac == pytest.approx(measured.batch_latency_ratio / measured.macs_ratio)
    assert reference_bundle(study).exists()
    record = TrialRecord(measurement=measured)
    assert TrialRecord.from_dict(record.to_dict(), "trial").measurement == measured  # stored as it is
    # a record written before these fields: loads with the defaults (timed alone, on ONNX Runtime)
    old = record.to_dict()
    for name in ("engine", "latency_ratio", "latency_ratio_min", "teacher_latency"):
        del old["measurement"][name]
    loaded = TrialRecord.from_dict(old, "trial").measurement
    assert loaded.engine == "onnxruntime" and loaded.latency_ratio is None and loaded.teacher_latency is None
