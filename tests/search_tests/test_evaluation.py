"""The trial context of the torch side: distillation targets computed once per augment, over every teacher."""

from __future__ import annotations

from pathlib import Path

import torch


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
