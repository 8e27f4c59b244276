"""search.progress: every long step reports as it goes. Outside a terminal (CI, a log file) that is one
line per finished unit on stderr: teacher epochs (also from the processes that train teachers side by
side), distillation targets, each trial's stages; ``--quiet`` silences them."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.progress import Units

REPO = Path(__file__).resolve().parents[2]


def test_units_log_one_line_per_finished_unit_with_an_eta(caplog) -> None:
    caplog.set_level(logging.INFO, logger="hycomp")
    units = Units("export", 3, "model")
    units.finished("first")
    units.finished("second")
    units.finished("third")
    units.close()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("export: model 1/3, first, ETA ")
    assert lines[1].startswith("export: model 2/3, second, ETA ")
    assert lines[2] == "export: model 3/3, third"  # nothing left: no ETA


def test_units_are_silent_when_quiet(caplog) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("hycomp").setLevel(logging.WARNING)
    try:
        units = Units("export", 2, "model")
        units.finished("first")
    finally:
        logging.getLogger("hycomp").setLevel(logging.NOTSET)
    assert not caplog.records


def _hycomp(arguments: list[str], results: Path) -> subprocess.CompletedProcess:
    """The CLI in its own process, stderr a pipe (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *arguments],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HYCOMP_RESULTS": str(results)},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """tiny.yaml with two teachers (trained side by side with --jobs 2)."""
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(synthetic_root)
    mapping["baseline"]["teachers"] = 2
    mapping["export"]["kd_targets"] = "ensemble"
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.mark.slow
def test_progress_lines_reach_non_terminal_output_and_quiet_silences_them(
    space: Path, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    baseline = _hycomp(["baseline", "--space", str(space), "--jobs", "2"], results)
    assert baseline.returncode == 0, baseline.stderr
    # each teacher's epochs, from the two worker processes that train them, with val accuracy and ETA
    for seed in (0, 1):
        assert re.search(rf"baseline: teacher seed {seed}: epoch 1/2, val 0\.\d+, ETA \d+ s", baseline.stderr)
        assert re.search(rf"baseline: teacher seed {seed}: epoch 2/2, val 0\.\d+\n", baseline.stderr)
    assert '"key"' in baseline.stdout

    search = _hycomp(["search", "--space", str(space), "--trials", "1"], results)
    assert search.returncode == 0, search.stderr
    assert "baseline: using cached teacher" in search.stderr
    assert re.search(r"distillation targets: computing 2 teacher\(s\) x d4 views", search.stderr)
    assert re.search(r"distillation targets: done in \d+ s", search.stderr)
    for stage in ("prune", "moe", "quantize"):  # the reference trial (nothing to fine-tune)
        assert re.search(rf"trial 0: {stage} done in \d+ s \(val 0\.\d+\)", search.stderr)
    assert re.search(r"trial 0: deploy done in \d+ s, measure done in \d+ s", search.stderr)

    quiet = _hycomp(
        ["search", "--space", str(space), "--trials", "1", "--study-name", "quiet", "--quiet"], results
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "trial 0" not in quiet.stderr + quiet.stdout.split("\n1 completed")[0]
    assert "distillation targets" not in quiet.stderr and "baseline:" not in quiet.stderr
    assert "1 completed trials" in quiet.stdout
    quiet_baseline = _hycomp(["baseline", "--space", str(space), "--quiet"], results)
    assert quiet_baseline.returncode == 0 and '"key"' in quiet_baseline.stdout
    assert "baseline:" not in quiet_baseline.stderr  # warnings (a weak teacher) still show
