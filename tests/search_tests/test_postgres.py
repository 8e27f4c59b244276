"""Several machines on one study: ``--storage postgresql://…`` against a real, throwaway PostgreSQL server.

The module fixture starts Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``) on 127.0.0.1 at a
free port, with a data folder in a temporary directory and trust authentication, and removes it all
afterwards. PostgreSQL refuses to run as root, so under root (CI) its programs run as the ``postgres``
system user. The tests skip, saying why, only when no server can be started.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.record import TrialRecord
from tests.search_tests.test_workers import check_exact_count, write_cheap_space

REPO = Path(__file__).resolve().parents[2]
DATABASE = "hycomp"
TARGET = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder holding initdb and pg_ctl."""
    candidates = [
        folder
        for folder in Path("/usr/lib/postgresql").glob("*/bin")
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists()
    ]
    return max(candidates, key=lambda path: int(path.parent.name), default=None) if candidates else None


def _as_postgres_user() -> list[str] | None:
    """The command prefix that runs a program as the ``postgres`` user when we are root ([] otherwise)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    return None


def _run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg2://postgres@127.0.0.1:<port>/hycomp`` on a fresh server, stopped and deleted after."""
    try:
        import psycopg2  # noqa: F401  (the driver the URL names)
    except ImportError:
        pytest.skip("psycopg2 is not installed (pip install -e '.[dev]' installs psycopg2-binary)")
    bin_folder = _postgres_bin()
    if bin_folder is None:
        pytest.skip(
            "no PostgreSQL server programs under /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    prefix = _as_postgres_user()
    if prefix is None:
        pytest.skip(
            "running as root but there is no 'postgres' user (or no runuser/setpriv) to start PostgreSQL"
        )
    # /tmp, not pytest's tmp_path: under root the latter sits in a 0700 folder the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="hycomp-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    data = base / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
    log_file = base / "server.log"
    started = False
    try:
        init = _run(
            [*prefix, str(bin_folder / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            + ["-E", "UTF8", "--no-sync"]
        )
        if init.returncode != 0:
            pytest.skip(f"initdb failed, no PostgreSQL server can be started: {init.stderr.strip()[-500:]}")
        for _attempt in range(3):  # the free port may be taken between the probe and the start
            port = _free_port()
            options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
            start = _run(
                [*prefix, str(bin_folder / "pg_ctl"), "-D", str(data), "-l", str(log_file)]
                + ["-o", options, "-w", "-t", "60", "start"]
            )
            if start.returncode == 0:
                started = True
                break
        if not started:
            log_tail = log_file.read_text()[-800:] if log_file.exists() else ""
            pytest.skip(
                f"pg_ctl start failed, no PostgreSQL server: {start.stderr.strip()[-300:]} {log_tail}"
            )
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{DATABASE}"
        connection = _connect(url, database="postgres")
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        connection.close()
        # The driver is named: SQLAlchemy >= 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2.
        yield url
    finally:
        if started:
            _run([*prefix, str(bin_folder / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def _search(space: Path, results: Path, url: str, *extra: str) -> subprocess.Popen:
    """One ``hycomp search`` process, as another machine would run it (its own results folder)."""
    env = {**os.environ, "HYCOMP_RESULTS": str(results)}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", "search", "--space", str(space), "--storage", url]
        + ["--no-progress", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def shared_study(postgres_url: str, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two ``hycomp search`` processes, each with its own results folder, fill one study on the server."""
    work = tmp_path_factory.mktemp("postgres")
    space = write_cheap_space(work, synthetic_root, "shared", trials=TARGET)
    machines = [work / "machine-a", work / "machine-b"]
    # The second machine joins once the first has created the study: two processes that open a fresh
    # database at the same instant race on CREATE TABLE (see test_fresh_database_opened_at_once).
    processes = [_search(space, machines[0], postgres_url)]
    try:
        deadline = time.time() + 120
        while "shared" not in _study_names(postgres_url):
            assert processes[0].poll() is None, processes[0].communicate()[1][-2000:]
            assert time.time() < deadline, "the first process did not create the study in time"
            time.sleep(0.2)
        processes.append(_search(space, machines[1], postgres_url))
        outputs = []
        deadline = time.time() + 480
        for process in processes:
            out, err = process.communicate(timeout=max(1.0, deadline - time.time()))
            outputs.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:  # only after a failure above
                process.kill()
                process.communicate()
    return {"url": postgres_url, "space": space, "machines": machines, "outputs": outputs}


def _connect(url: str, database: str | None = None):
    """A psycopg2 connection to the server of ``url`` (its database, or ``database``)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    connection = psycopg2.connect(
        host=parts.host, port=parts.port, user=parts.username, dbname=database or parts.database
    )
    connection.autocommit = True
    return connection


def _study_names(url: str) -> list[str]:
    """Study names straight from Optuna's table (opening an RDBStorage here would itself create tables)."""
    import psycopg2

    try:
        connection = _connect(url)
    except psycopg2.Error:
        return []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT study_name FROM studies")
            return [row[0] for row in cursor.fetchall()]
    except psycopg2.Error:  # the tables do not exist yet
        return []
    finally:
        connection.close()


def _load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="shared", storage=url)


@pytest.mark.slow
def test_two_machines_reach_exactly_the_target(shared_study: dict) -> None:
    for code, _out, err in shared_study["outputs"]:
        assert code == 0, err[-2000:]
    study = _load(shared_study["url"])
    # each machine keeps the artifacts of the trials it trained; together they hold every trained trial
    # (a trial that reused an identical earlier result, a repeat, trained nothing and has none)
    complete = [trial for trial in study.trials if trial.state == TrialState.COMPLETE]
    trained = {trial.number for trial in complete if not TrialRecord.of(trial).is_repeat}
    per_machine = [
        {
            trial.number
            for trial in complete
            if (results / "shared" / "trials" / f"trial_{trial.number}").exists()
        }
        for results in shared_study["machines"]
    ]
    assert per_machine[0] | per_machine[1] == trained and not per_machine[0] & per_machine[1]
    check_exact_count(study, TARGET, *(results / "shared" / "trials" for results in shared_study["machines"]))


@pytest.mark.slow
def test_second_invocation_resumes_without_new_trials(shared_study: dict) -> None:
    before = len(_load(shared_study["url"]).trials)
    process = _search(shared_study["space"], shared_study["machines"][0], shared_study["url"])
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert f"{TARGET} completed trials" in out
    assert len(_load(shared_study["url"]).trials) == before


@pytest.mark.slow
def test_front_reads_the_study_from_postgres(
    shared_study: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    results = shared_study["machines"][0]
    monkeypatch.setenv("HYCOMP_RESULTS", str(results))
    folder = results / "shared"
    assert not (folder / "study.db").exists(), "the study lives on the server, not in a local SQLite file"
    assert main(["front", str(folder), "--storage", shared_study["url"]]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of shared" in out and f"of {TARGET} completed trials" in out
    assert (folder / "front.csv").stat().st_size > 0
    # without --storage the folder's default SQLite file has no such study: one clear message, exit 2
    assert main(["front", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "shared" in err and "Traceback" not in err


def _fresh_database(postgres_url: str, name: str) -> str:
    connection = _connect(postgres_url, database="postgres")
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"{postgres_url.rsplit('/', 1)[0]}/{name}"


def test_fresh_database_opened_at_once(postgres_url: str) -> None:
    """Machines started together on an empty database all open it (one creates the tables)."""
    import threading

    from search.storage import make_storage

    url = _fresh_database(postgres_url, "race")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_storage() -> None:
        barrier.wait()
        try:
            make_storage(url)
        except BaseException as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=open_storage) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []


def test_bare_postgresql_url_opens(postgres_url: str) -> None:
    """The URL form the README documents, with only the dev extra's driver installed."""
    from search.storage import make_storage

    url = postgres_url.replace("postgresql+psycopg2://", "postgresql://")
    optuna.create_study(study_name="bare-url", storage=make_storage(url))
    assert "bare-url" in optuna.get_all_study_names(storage=postgres_url)
