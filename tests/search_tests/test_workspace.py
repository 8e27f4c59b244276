"""Where outputs go: a study folder is always one folder directly inside the results root."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from search.workspace import study_dir


@pytest.mark.parametrize("name", ["", ".", "..", "a/..", "../b", "a/b", "/abs"])
def test_a_study_folder_outside_the_results_root_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        study_dir(name, tmp_path / "results")
    message = str(caught.value)
    assert "study.name" in message and repr(name) in message and "plain folder name" in message
    assert not (tmp_path / "results").exists()


def test_a_plain_name_is_a_folder_inside_the_root(tmp_path: Path) -> None:
    assert study_dir("tiny", tmp_path) == tmp_path / "tiny"
