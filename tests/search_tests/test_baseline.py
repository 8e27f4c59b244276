"""search.baseline: the teacher's cache key follows its training recipe, and old keys stay valid."""

from __future__ import annotations

from pathlib import Path

import yaml

from search.baseline import baseline_key, teacher_recipe
from search.space import dump_space, load_space, parse_space

REPO = Path(__file__).resolve().parents[2]


def test_key_changes_with_the_recipe_only() -> None:
    default = parse_space({})
    assert baseline_key(default) == baseline_key(parse_space({"study": {"trials": 99}}))
    keys = {
        baseline_key(parse_space({"baseline": change}))
        for change in ({}, {"augment": "d4"}, {"augment": "none"}, {"epochs": 3}, {"seed": 1})
    }
    assert len(keys) == 5
    assert teacher_recipe(parse_space({"baseline": {"augment": "d4"}})).augment == "d4"


def test_the_shipped_teacher_keeps_the_key_it_was_cached_under() -> None:
    """The 40-epoch teacher (20 min on 2 cores) was cached before `baseline.augment` existed; its recipe
    (crops + flips) is unchanged, so its key must be too or every user retrains it."""
    mapping = yaml.safe_load(dump_space(load_space(REPO / "search_spaces" / "bloodmnist.yaml")))
    mapping["baseline"]["augment"] = "flips"
    assert baseline_key(parse_space(mapping)) == "bloodmnist-resnet20-b9f99b96bc5b"
