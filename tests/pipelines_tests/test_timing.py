"""pipelines.timing: the latency harness records what a number means, and needs no torch."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.timing import cpu_description, measure_interleaved, measure_latency

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


def _work(iterations: int) -> Callable[[], object]:
    """A deterministic CPU-bound call whose time grows linearly with ``iterations``."""
    return lambda: sum(range(iterations))


@contextlib.contextmanager
def _cpu_burners(seconds: float, per_core: int = 1) -> Iterator[None]:
    """``per_core`` busy subprocesses per usable core; each stops itself after ``seconds`` and is killed on exit."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    count = per_core * len(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        time.sleep(0.2)  # let them start before the timing does
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


def test_interleaved_ratio_is_stable_under_cpu_load() -> None:
    small, large = _work(20_000), _work(40_000)
    quiet = measure_interleaved(
        large, small, rounds=20, calls_per_round=10, warmup=3, backend=("2N", "N"), threads=1, batch=1
    )
    with _cpu_burners(seconds=8):
        loaded = measure_interleaved(
            large, small, rounds=20, calls_per_round=10, warmup=3, backend=("2N", "N"), threads=1, batch=1
        )
    for stats in (quiet, loaded):
        assert 1.5 <= stats.ratio <= 2.5, stats.round_ratios
        assert len(stats.round_ratios) == 20
        assert stats.candidate.repeats == stats.reference.repeats == 200
    assert abs(loaded.ratio / quiet.ratio - 1) < 0.25
    assert (loaded.candidate.backend, loaded.reference.backend) == ("2N", "N")
    record = loaded.as_dict()
    assert record["ratio"] == loaded.ratio_round_median and record["candidate"]["median_ms"] > 0


def test_interleaved_alternates_the_order_and_warms_both() -> None:
    calls: list[str] = []
    stats = measure_interleaved(
        lambda: calls.append("a"),
        lambda: calls.append("b"),
        rounds=3,
        calls_per_round=2,
        warmup=1,
        backend="noop",
        threads=2,
        batch=4,
    )
    assert "".join(calls) == "ab" + "aabb" + "bbaa" + "aabb"
    assert (stats.rounds, stats.calls_per_round, stats.candidate.threads, stats.reference.batch) == (
        3,
        2,
        2,
        4,
    )
    row = stats.as_row()  # a benchmark report's columns: the candidate's, the teacher's, their ratio
    assert (row["threads"], row["batch"], row["latency_ratio"]) == (2, 4, stats.ratio)
    assert (row["min_ms"], row["teacher_median_ms"]) == (stats.candidate.min_ms, stats.reference.median_ms)
    with pytest.raises(ConfigError, match="rounds"):
        measure_interleaved(
            lambda: None, lambda: None, rounds=0, calls_per_round=1, warmup=0, backend="x", threads=1, batch=1
        )


@pytest.mark.slow
def test_a_plain_ratio_is_distorted_by_load_that_changes_between_the_two_runs() -> None:
    """Why interleave: timing the reference quietly and the candidate under load (calls longer than a
    scheduler slice, so they are preempted) gives a ratio far from the true 2."""
    small, large = _work(200_000), _work(400_000)
    reference = measure_latency(small, backend="N", threads=1, batch=1, warmup=2, repeats=20)
    # two burners a core: the candidate gets at most about a third of one, whatever the scheduler's mood
    with _cpu_burners(seconds=6, per_core=2):
        candidate = measure_latency(large, backend="2N", threads=1, batch=1, warmup=2, repeats=20)
    assert candidate.median_ms / reference.median_ms > 2.5
