"""search.storage: the default SQLite file, journal files and a clear error for a storage that cannot open."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage

from pipelines.errors import ConfigError
from search.storage import default_storage, make_storage


def test_default_storage_is_the_study_folders_sqlite_file(tmp_path: Path) -> None:
    url = default_storage(tmp_path / "study")
    assert url == f"sqlite:///{(tmp_path / 'study' / 'study.db').as_posix()}"
    storage = make_storage(url)  # creates the folder
    assert isinstance(storage, RDBStorage) and (tmp_path / "study").is_dir()
    optuna.create_study(study_name="s", storage=storage)
    assert (tmp_path / "study" / "study.db").exists()


def test_a_log_path_selects_a_journal_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "study.log"
    storage = make_storage(str(path))
    assert isinstance(storage, JournalStorage)
    optuna.create_study(study_name="s", storage=storage)
    assert path.exists()


def test_an_unreachable_storage_names_the_flag_and_the_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        make_storage("nosuchdialect://localhost/db")
    message = str(caught.value)
    assert message.startswith("--storage: cannot open 'nosuchdialect://localhost/db'")
    assert "driver is installed" in message
