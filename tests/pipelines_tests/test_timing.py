"""pipelines.timing: the latency harness records what a number means, and needs no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.timing import cpu_description, measure_latency

REPO = Path(__file__).resolve().parents[2]


def test_stats_are_ordered_and_labelled() -> None:
    calls = []
    stats = measure_latency(lambda: calls.append(1), backend="noop", threads=1, batch=4, warmup=3, repeats=20)
    assert len(calls) == 23 and stats.repeats == 20 and stats.warmup == 3
    assert 0 <= stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert (stats.backend, stats.threads, stats.batch) == ("noop", 1, 4)
    assert stats.versions["cpu"] == cpu_description() and "python" in stats.versions
    assert stats.label() == "noop, 1 thread(s), batch 4"


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 1), (5, -1)])
def test_bad_counts_are_refused(repeats: int, warmup: int) -> None:
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(lambda: None, backend="noop", threads=1, batch=1, warmup=warmup, repeats=repeats)


def test_the_harness_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom pipelines.timing import measure_latency\n"
        "stats = measure_latency(lambda: None, backend='x', threads=1, batch=1, repeats=2)\n"
        "print('torch' in sys.modules, 'torch' in stats.versions)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert completed.stdout.split() == ["False", "True"], completed.stderr
