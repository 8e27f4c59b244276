"""pipelines.symmetry: the 8 symmetries of a square image, one definition for numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.symmetry import SYMMETRIES, VIEWS, apply, check_views, views


def _reference(images: np.ndarray) -> list[np.ndarray]:
    """The order every part of hycomp relies on: identity, flip W, flip H, both, then their transposes."""
    first = [images, images[..., ::-1], images[..., ::-1, :], images[..., ::-1, ::-1]]
    return first + [view.swapaxes(-1, -2) for view in first]


def test_numpy_and_torch_views_are_the_same_and_in_the_documented_order() -> None:
    images = np.random.default_rng(0).random((2, 3, 5, 5)).astype(np.float32)
    expected = _reference(images)
    for count in VIEWS:
        as_numpy = views(images, count)
        as_torch = views(torch.from_numpy(images), count)
        assert len(as_numpy) == len(as_torch) == count
        for index in range(count):
            np.testing.assert_array_equal(as_numpy[index], expected[index])
            np.testing.assert_array_equal(as_torch[index].numpy(), expected[index])


def test_the_first_views_form_groups_and_all_eight_differ() -> None:
    image = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    distinct = {apply(image, index).tobytes() for index in range(len(SYMMETRIES))}
    assert len(distinct) == 8
    for count in VIEWS:  # closed: composing two symmetries of the group stays in the group
        group = {apply(image, index).tobytes() for index in range(count)}
        for first in range(count):
            for second in range(count):
                assert apply(apply(image, first), second).tobytes() in group


@pytest.mark.parametrize("count", [0, 3, 5, 16, "2", 2.5])
def test_check_views_names_the_field(count) -> None:
    with pytest.raises(ConfigError, match=r"space\.views: .* use one of \[1, 2, 4, 8\]"):
        check_views(count, "space.views")
    assert check_views(4, "space.views") == 4
