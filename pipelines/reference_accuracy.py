"""Published accuracies to check a teacher against: a teacher far under them was trained with a recipe
that does not fit the data (e.g. flips on images whose labels depend on left and right).

Values: test accuracy (ACC) of ResNet-18 at 28x28 from Table 3 ("2D datasets") of Jiancheng Yang, Rui
Shi, Donglai Wei, Zequan Liu, Lin Zhao, Bilian Ke, Hanspeter Pfister, Bingbing Ni, "MedMNIST v2 - A
large-scale lightweight benchmark for 2D and 3D biomedical image classification", Scientific Data 10,
41 (2023), doi:10.1038/s41597-022-01721-8 (means over at least three runs, as the paper reports).
ChestMNIST is multi-label (its ACC counts each label separately) and is listed for completeness only.
"""

from __future__ import annotations

__all__ = ["RESNET18_28_TEST_ACCURACY", "REFERENCE_MARGIN", "reference_accuracy", "reference_warning"]

RESNET18_28_TEST_ACCURACY = {
    "pathmnist": 0.907,
    "chestmnist": 0.947,
    "dermamnist": 0.735,
    "octmnist": 0.743,
    "pneumoniamnist": 0.854,
    "retinamnist": 0.524,
    "breastmnist": 0.863,
    "bloodmnist": 0.958,
    "tissuemnist": 0.676,
    "organamnist": 0.935,
    "organcmnist": 0.900,
    "organsmnist": 0.782,
}
REFERENCE_MARGIN = 0.03  # a teacher more than 3 points under the reference gets a warning


def reference_accuracy(dataset: str) -> float | None:
    """The published ResNet-18 (28) test accuracy of a MedMNIST flag, None for other datasets."""
    return RESNET18_28_TEST_ACCURACY.get(dataset.lower())


def reference_warning(dataset: str, teacher_accuracy: float, image_size: int = 28) -> str | None:
    """A warning when ``teacher_accuracy`` (test, 0..1) is more than :data:`REFERENCE_MARGIN` under the
    published one for ``dataset``; None when it is not, or when there is no reference for it."""
    reference = reference_accuracy(dataset)
    if reference is None or teacher_accuracy >= reference - REFERENCE_MARGIN:
        return None
    return (
        f"teacher test accuracy {teacher_accuracy:.3f} on {dataset} ({image_size} px) is "
        f"{100 * (reference - teacher_accuracy):.1f} points under the published ResNet-18 (28) "
        f"{reference:.3f} (MedMNIST v2, Yang et al. 2023). The recipe may not fit the data: check the "
        "augmentation (augment: auto drops symmetries that change labels), the epochs and the model width."
    )
