"""pipelines.reference_accuracy: the published MedMNIST table and the teacher warning."""

from __future__ import annotations

from pipelines.reference_accuracy import RESNET18_28_TEST_ACCURACY, reference_accuracy, reference_warning

TWELVE_2D = [
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
]


def test_table_covers_the_twelve_2d_datasets_with_accuracies() -> None:
    assert set(RESNET18_28_TEST_ACCURACY) == set(TWELVE_2D)
    assert all(0.5 < value < 1.0 for value in RESNET18_28_TEST_ACCURACY.values())
    assert reference_accuracy("BloodMNIST") == 0.958 and reference_accuracy("mnist") is None


def test_warning_only_more_than_three_points_under() -> None:
    assert reference_warning("bloodmnist", 0.9735) is None
    assert reference_warning("bloodmnist", 0.930) is None  # 2.8 points under: within the margin
    message = reference_warning("organamnist", 0.78)
    assert message is not None and "15.5 points under" in message and "0.935" in message
    assert "augment" in message
    assert reference_warning("mydata", 0.10) is None  # no reference, no warning
