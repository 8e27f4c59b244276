"""The 8 symmetries of a square image (the dihedral group D4), defined once for torch tensors and numpy
arrays: training augmentation, ensemble distillation targets, test-time views in torch and in the
deployed runtime all take their views from here, in this order."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.errors import ConfigError

__all__ = ["SYMMETRIES", "VIEWS", "apply", "check_views", "views"]

# (name, flip width, flip height, then transpose): the first 1, 2, 4 or 8 form a group (identity;
# horizontal flips; all flips; D4), which is why test-time views come in those counts.
SYMMETRIES: tuple[tuple[str, bool, bool, bool], ...] = (
    ("identity", False, False, False),
    ("hflip", True, False, False),
    ("vflip", False, True, False),
    ("rot180", True, True, False),
    ("transpose", False, False, True),
    ("rot90", True, False, True),
    ("rot270", False, True, True),
    ("antitranspose", True, True, True),
)
VIEWS = (1, 2, 4, 8)  # numbers of test-time views: the groups among the first n symmetries


def _flip(images: Any, axis: int) -> Any:
    return images.flip(axis) if hasattr(images, "flip") else np.flip(images, axis)


def apply(images: Any, index: int) -> Any:
    """Symmetry ``index`` of SYMMETRIES applied to the last two axes of a tensor or an array."""
    _, flip_width, flip_height, transpose = SYMMETRIES[index]
    if flip_width:
        images = _flip(images, -1)
    if flip_height:
        images = _flip(images, -2)
    return images.swapaxes(-1, -2) if transpose else images


def views(images: Any, count: int) -> list[Any]:
    """The first ``count`` symmetric views of ``images`` (a tensor or an array, square in the last two axes)."""
    return [apply(images, index) for index in range(count)]


def check_views(count: object, field: str) -> int:
    """``count`` if it is a number of test-time views (``VIEWS``); else a ConfigError naming ``field``."""
    if count not in VIEWS:
        raise ConfigError(f"{field}: {count!r} is not a number of test-time views; use one of {list(VIEWS)}.")
    return int(count)
