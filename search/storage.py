"""Where a study lives: SQLite at results/<study>/study.db by default, any Optuna RDB URL
(postgresql://..., mysql://...) or a JournalStorage file (a path ending in ``.log`` / ``.journal``).

RDB storages run Optuna's heartbeat, so a trial whose process was killed (SIGKILL) is marked failed and its
configuration retried by ``RetryHeartbeatStaleTrialCallback``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from pipelines.errors import ConfigError

__all__ = ["default_storage", "make_storage"]

# A killed worker's trial is noticed once its heartbeat is GRACE seconds old (env overrides for tests).
HEARTBEAT_SECONDS = int(os.environ.get("HYCOMP_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = int(os.environ.get("HYCOMP_GRACE_SECONDS", "60"))


def default_storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'study.db').as_posix()}"


def _driver_url(url: str) -> str:
    """A bare ``postgresql://`` URL means psycopg 3 to SQLAlchemy >= 2.1; use psycopg2 when only it is here."""
    has = importlib.util.find_spec
    if url.startswith("postgresql://") and has("psycopg") is None and has("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def _open_rdb(url: str, engine_kwargs: dict, attempts: int = 6) -> RDBStorage:
    """RDBStorage, retried when machines started together race to create the tables of a fresh database.

    Optuna's CREATE TABLE is not atomic across processes: the loser of the race gets an IntegrityError or
    ProgrammingError (PostgreSQL: UniqueViolation on pg_type). After the winner commits, opening succeeds.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    def open_once() -> RDBStorage:
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs=engine_kwargs,
        )

    for attempt in range(attempts - 1):
        try:
            return open_once()
        except (IntegrityError, ProgrammingError, OperationalError) as error:
            if isinstance(error, OperationalError) and "locked" not in str(error):
                raise  # a real connection problem, not a race: report it at once
            time.sleep(0.2 * (attempt + 1) + random.uniform(0, 0.3))
    return open_once()


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; raises ConfigError with the fix when it cannot be opened."""
    try:
        if url.endswith((".log", ".journal")) and "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            # several worker processes may write at once: wait for SQLite's lock instead of failing
            engine_kwargs["connect_args"] = {"timeout": 120}
        return _open_rdb(_driver_url(url), engine_kwargs)
    except Exception as error:  # sqlalchemy / driver errors have many types
        raise ConfigError(
            f"--storage: cannot open {url!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "Check the URL, that the server is running and reachable, and that its driver is installed "
            "(PostgreSQL: pip install psycopg2-binary, or name the driver: postgresql+psycopg2://...; "
            "MySQL: pip install pymysql and use mysql+pymysql://...)."
        ) from None
