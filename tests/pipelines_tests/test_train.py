"""pipelines.train: the loop learns, is deterministic, distils, fails loudly on divergence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipelines.data import Dataset, Split, symmetry_views
from pipelines.errors import CompressionError, ConfigError
from pipelines.models import build_model
from pipelines.train import (
    TrainConfig,
    distillation_loss,
    ensemble_logits,
    evaluate,
    predict_logits,
    train,
)

FAST = TrainConfig(epochs=3, lr=0.05, batch_size=32)


def _small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet8", 3, 8, 0.5)


def _mean_loss(model: torch.nn.Module, split: Split) -> float:
    return float(F.cross_entropy(predict_logits(model, split), split.labels))


@pytest.fixture(scope="module")
def trained(tiny_data: Dataset) -> torch.nn.Module:
    model = _small_model()
    train(model, tiny_data.train, FAST)
    return model


def test_training_learns_the_synthetic_task(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    untrained = _small_model()
    chance = 1.0 / tiny_data.num_classes
    assert _mean_loss(trained, tiny_data.train) < 0.5 * _mean_loss(untrained, tiny_data.train)
    assert evaluate(trained, tiny_data.val) > 4 * chance


def test_report_counts_steps_and_leaves_eval_mode(tiny_data: Dataset) -> None:
    model = _small_model()
    progress: list[tuple[int, int]] = []
    report = train(
        model,
        tiny_data.train,
        FAST.replace(epochs=1.5),
        on_step=lambda done, total: progress.append((done, total)),
    )
    assert report.steps == 15  # round(1.5 * ceil(320 / 32))
    assert progress == [(step, 15) for step in range(1, 16)]
    assert report.seconds > 0 and torch.isfinite(torch.tensor(report.final_loss))
    assert not model.training


def test_subset_trains_on_a_fraction(tiny_data: Dataset) -> None:
    report = train(_small_model(), tiny_data.train, FAST.replace(epochs=1, subset=0.5))
    assert report.steps == 5  # 160 images, batch 32


def test_same_seed_gives_identical_weights(tiny_data: Dataset) -> None:
    cfg = FAST.replace(epochs=0.5, seed=3)
    first, second, other = _small_model(), _small_model(), _small_model()
    train(first, tiny_data.train, cfg)
    train(second, tiny_data.train, cfg)
    train(other, tiny_data.train, cfg.replace(seed=4))
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert not all(torch.equal(first_state[key], other_state[key]) for key in first_state)


def test_per_epoch_validation_changes_neither_the_weights_nor_the_random_stream(tiny_data: Dataset) -> None:
    cfg = FAST.replace(epochs=2.5, seed=5)
    plain, watched = _small_model(), _small_model()
    train(plain, tiny_data.train, cfg)
    after_plain = torch.rand(3)
    epochs: list[tuple[int, int, float | None]] = []
    train(
        watched,
        tiny_data.train,
        cfg,
        on_epoch=lambda epoch, total, accuracy: epochs.append((epoch, total, accuracy)),
        val=tiny_data.val,
    )
    after_watched = torch.rand(3)
    plain_state, watched_state = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(plain_state[key], watched_state[key]) for key in plain_state)
    assert torch.equal(after_plain, after_watched)  # the evaluations drew no random numbers
    assert [(epoch, total) for epoch, total, _ in epochs] == [(1, 3), (2, 3), (3, 3)]
    assert all(0 <= accuracy <= 1 for _, _, accuracy in epochs)
    assert epochs[-1][2] == evaluate(watched, tiny_data.val)
    silent: list[float | None] = []
    train(_small_model(), tiny_data.train, cfg.replace(epochs=1), on_epoch=lambda e, t, a: silent.append(a))
    assert silent == [None]  # no val split: no evaluation


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_other_schedules_train(tiny_data: Dataset, schedule: str) -> None:
    model = _small_model()
    before = copy.deepcopy(model.state_dict())
    report = train(model, tiny_data.train, FAST.replace(epochs=0.5, schedule=schedule))
    assert report.steps == 5
    assert not torch.equal(before["fc.weight"], model.state_dict()["fc.weight"])


def test_distillation_from_a_teacher(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    teacher = copy.deepcopy(trained)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = _small_model(seed=1)
    report = train(student, tiny_data.train, FAST.replace(kd_alpha=0.7, kd_temperature=2.0), teacher=teacher)
    assert torch.isfinite(torch.tensor(report.final_loss))
    assert evaluate(student, tiny_data.val) > 0.5
    # The teacher is only read: same weights, same BatchNorm statistics, left in eval mode.
    assert all(torch.equal(teacher_before[key], teacher.state_dict()[key]) for key in teacher_before)
    assert not teacher.training


def test_distillation_changes_the_loss(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    """With kd_alpha=1 the hard labels are ignored: a student distilled from a teacher ends elsewhere
    than one trained on labels alone (same seed, same batches)."""
    cfg = FAST.replace(epochs=0.5)
    plain, distilled = _small_model(seed=2), _small_model(seed=2)
    train(plain, tiny_data.train, cfg)
    train(distilled, tiny_data.train, cfg.replace(kd_alpha=1.0), teacher=trained)
    assert not torch.equal(plain.fc.weight, distilled.fc.weight)


def test_distillation_loss_properties() -> None:
    logits = torch.randn(6, 8)
    assert distillation_loss(logits, logits.clone(), 4.0).abs() < 1e-6
    assert distillation_loss(logits, torch.randn(6, 8), 4.0) > 0
    # Scaled by T^2 so the gradient size does not vanish at high temperature.
    student, teacher = torch.randn(6, 8), torch.randn(6, 8)
    ratio = distillation_loss(student * 2, teacher * 2, 2.0) / distillation_loss(student, teacher, 1.0)
    assert torch.isclose(ratio, torch.tensor(4.0), rtol=1e-4)


def test_divergence_raises_compression_error(tiny_data: Dataset) -> None:
    model = _small_model()
    cfg = FAST.replace(lr=1e30, schedule="constant", augment="none", epochs=2)
    with pytest.raises(CompressionError, match="diverged"):
        train(model, tiny_data.train, cfg)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("lr", -0.1),
        ("batch_size", 0),
        ("weight_decay", -1.0),
        ("label_smoothing", 1.0),
        ("kd_alpha", 1.5),
        ("kd_temperature", 0.0),
        ("subset", 0.0),
        ("subset", 1.2),
        ("schedule", "linear"),
        ("precision", "fp16"),
    ],
)
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_bf16_training_learns_and_keeps_fp32_weights(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    """precision: bf16 autocasts the forward pass only: weights, their layout and evaluation stay fp32,
    and the model learns the task as well as in fp32 (same data order and seed)."""
    model = _small_model()
    train(model, tiny_data.train, FAST.replace(precision="bf16"))
    assert all(p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    assert not torch.is_autocast_cpu_enabled()
    bf16_accuracy, fp32_accuracy = evaluate(model, tiny_data.val), evaluate(trained, tiny_data.val)
    assert bf16_accuracy > 4 / tiny_data.num_classes
    assert abs(bf16_accuracy - fp32_accuracy) < 0.1
    # The numerics really differ from the fp32 run (autocast was on), by little.
    weights = [(a - b).abs().max() for a, b in zip(model.parameters(), trained.parameters(), strict=True)]
    assert max(weights) > 0


def test_bf16_distillation_from_precomputed_targets(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    targets = ensemble_logits(trained, tiny_data.train, "flips")
    split = tiny_data.train.with_teacher_logits(targets)
    model = _small_model(1)
    report = train(model, split, FAST.replace(epochs=1, kd_alpha=0.7, augment="flips", precision="bf16"))
    assert torch.isfinite(torch.tensor(report.final_loss))


def test_batch_size_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=1)


def test_replace_validates_and_keeps_other_fields() -> None:
    cfg = TrainConfig(lr=0.1, seed=5)
    changed = cfg.replace(epochs=2.0)
    assert (changed.lr, changed.seed, changed.epochs) == (0.1, 5, 2.0)
    with pytest.raises(ConfigError, match="train.lr"):
        cfg.replace(lr=0)


def test_evaluate_is_accuracy_and_refuses_empty_splits(tiny_data: Dataset, trained: torch.nn.Module) -> None:
    logits = predict_logits(trained, tiny_data.val)
    assert logits.shape == (96, 8)
    expected = float((logits.argmax(dim=1) == tiny_data.val.labels).float().mean())
    assert evaluate(trained, tiny_data.val, batch_size=7) == pytest.approx(expected)
    empty = Split(tiny_data.val.images[:0], tiny_data.val.labels[:0])
    with pytest.raises(ConfigError, match="empty"):
        evaluate(trained, empty)


def test_ensemble_logits_average_the_teacher_over_the_views(tiny_data: Dataset, trained) -> None:
    split = Split(tiny_data.val.images[:40], tiny_data.val.labels[:40])
    assert torch.allclose(ensemble_logits(trained, split, "none"), predict_logits(trained, split))
    expected = torch.stack([trained(view) for view in symmetry_views(split.images, "d4")]).mean(dim=0)
    assert torch.allclose(ensemble_logits(trained, split, "d4", batch_size=16), expected, atol=1e-5)
    # the average over a group does not change when the images are moved by one of its symmetries
    flipped = Split(split.images.transpose(-1, -2).flip(-1), split.labels)
    assert torch.allclose(ensemble_logits(trained, flipped, "d4"), expected, atol=1e-4)


def test_precomputed_targets_replace_the_teacher(tiny_data: Dataset) -> None:
    """A split with teacher logits distils from them: no teacher module is needed, and a student pulled
    (kd_alpha 1) toward targets that all name class 3 ends up predicting class 3."""
    split = tiny_data.train
    targets = torch.full((len(split), tiny_data.num_classes), -5.0)
    targets[:, 3] = 5.0
    student = _small_model()
    train(student, split.with_teacher_logits(targets), FAST.replace(kd_alpha=1.0, epochs=2))
    predictions = predict_logits(student, tiny_data.val).argmax(dim=1)
    assert (predictions == 3).float().mean() > 0.9
    assert evaluate(student, tiny_data.val) < 0.5  # the labels were ignored: it learnt the targets


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def on_step(done: int, total: int) -> None:
        if done == step:
            raise _Interrupt  # as Ctrl-C would, mid-epoch

    return on_step


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(
    tiny_data: Dataset, tmp_path, schedule: str
) -> None:
    cfg = FAST.replace(epochs=3, schedule=schedule, augment="d4")
    whole = _small_model()
    train(whole, tiny_data.train, cfg)
    checkpoint = tmp_path / "progress.pt"
    interrupted = _small_model()
    with pytest.raises(_Interrupt):  # 10 steps an epoch: killed in epoch 2, after one checkpoint
        train(interrupted, tiny_data.train, cfg, checkpoint=checkpoint, on_step=_interrupt_at(15))
    assert checkpoint.exists()
    resumed = _small_model(seed=5)  # another start: every weight must come from the checkpoint
    report = train(resumed, tiny_data.train, cfg, checkpoint=checkpoint)
    assert report.resumed_at == 10 and report.steps == 30
    expected, got = whole.state_dict(), resumed.state_dict()
    assert all(torch.allclose(expected[key].float(), got[key].float(), atol=1e-6) for key in expected)


def test_a_checkpoint_of_another_setup_or_a_broken_one_is_not_resumed(tiny_data: Dataset, tmp_path) -> None:
    checkpoint = tmp_path / "progress.pt"
    with pytest.raises(_Interrupt):
        train(_small_model(), tiny_data.train, FAST, checkpoint=checkpoint, on_step=_interrupt_at(15))
    other = train(_small_model(), tiny_data.train, FAST.replace(lr=0.01), checkpoint=checkpoint)
    assert other.resumed_at == 0 and other.steps == 30  # another learning rate: trained from the start
    checkpoint.write_bytes(b"not a checkpoint")
    fresh, reference = _small_model(), _small_model()
    assert train(fresh, tiny_data.train, FAST, checkpoint=checkpoint).resumed_at == 0
    train(reference, tiny_data.train, FAST)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in fresh.state_dict().items())
