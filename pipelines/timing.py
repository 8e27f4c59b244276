"""The one latency harness: warm-up, repeated timed calls, minimum, median and spread, with the backend,
threads, batch, library versions and CPU recorded beside the number. Torch-free, so the deployed runtime
times itself without importing torch."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from pipelines.errors import ConfigError

__all__ = ["InterleavedStats", "LatencyStats", "cpu_description", "measure_interleaved", "measure_latency"]


def _version(package: str) -> str | None:
    """The installed version of ``package`` without importing it (None when absent)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class LatencyStats:
    min_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch: int
    backend: str
    versions: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        return f"{self.backend}, {self.threads} thread(s), batch {self.batch}"


# Instruction sets that change int8 speed: VNNI (AVX512 or AVX) multiplies uint8 x int8 without the
# 16-bit saturation of AVX2's VPMADDUBSW; timings from CPUs with and without them do not compare.
_CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "sve")


@functools.cache
def cpu_description() -> str:
    """e.g. ``AMD EPYC (x86_64; avx2 avx512f avx512_vnni), 2 logical cores``: what latencies ran on."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the platform module's name is all there is
        pass
    features = " ".join(feature for feature in _CPU_FEATURES if feature in flags)
    name = model or platform.processor() or platform.machine()
    return (
        f"{name} ({platform.machine()}{'; ' + features if features else ''}), {os.cpu_count()} logical cores"
    )


def _versions() -> dict:
    versions = {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "onnxruntime", "openvino") if _version(name)},
        "cpu": cpu_description(),
    }
    return versions


def measure_latency(
    run: Callable[[], object],
    *,
    backend: str,
    threads: int,
    batch: int,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 0.0,
) -> LatencyStats:
    """Time ``run()``: ``warmup`` untimed calls, then at least ``repeats`` timed calls (and at least
    ``min_seconds`` of timing); returns the median and the 10th/90th percentiles in milliseconds.

    The caller fixes the thread count of its backend (``torch_runner`` does for torch; ONNX Runtime
    sessions take it in their options) and passes it here so it is recorded.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        run()
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        tick = time.perf_counter()
        run()
        samples.append((time.perf_counter() - tick) * 1000.0)
    return _stats(samples, backend=backend, threads=threads, batch=batch, warmup=warmup)


def _stats(samples: list[float], *, backend: str, threads: int, batch: int, warmup: int) -> LatencyStats:
    """LatencyStats of call times in milliseconds."""
    samples = sorted(samples)

    def quantile(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))]

    return LatencyStats(
        min_ms=samples[0],
        median_ms=statistics.median(samples),
        p10_ms=quantile(0.1),
        p90_ms=quantile(0.9),
        repeats=len(samples),
        warmup=warmup,
        threads=threads,
        batch=batch,
        backend=backend,
        versions=_versions(),
    )


@dataclass
class InterleavedStats:
    """Two callables timed in alternating rounds, so both see the same machine load.

    ``ratio`` (= ``ratio_round_median``) is the one to compare: the median over rounds of the ratio of
    the two rounds' medians cancels load that drifts slower than a round, and a burst hits one round only.
    ``ratio_median`` (median / median over all calls) and ``ratio_min`` (min / min) are kept beside it.
    """

    candidate: LatencyStats
    reference: LatencyStats
    ratio_median: float
    ratio_min: float
    ratio_round_median: float
    round_ratios: list[float]
    rounds: int
    calls_per_round: int

    @property
    def ratio(self) -> float:
        """Candidate time / reference time: below 1 means the candidate is faster."""
        return self.ratio_round_median

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}

    def as_row(self) -> dict:
        """One report row's timing columns, the reference named ``teacher`` (the benchmarks' yardstick)."""
        return {
            "threads": self.candidate.threads,
            "batch": self.candidate.batch,
            "min_ms": self.candidate.min_ms,
            "median_ms": self.candidate.median_ms,
            "teacher_min_ms": self.reference.min_ms,
            "teacher_median_ms": self.reference.median_ms,
            "latency_ratio": self.ratio,
        }


def measure_interleaved(
    candidate: Callable[[], object],
    reference: Callable[[], object],
    *,
    rounds: int,
    calls_per_round: int,
    warmup: int,
    backend: str | tuple[str, str],
    threads: int,
    batch: int,
) -> InterleavedStats:
    """Time ``candidate()`` against ``reference()`` in ``rounds`` alternating rounds of ``calls_per_round``
    calls each, after ``warmup`` untimed calls of both. The order flips every round (A B, B A, A B, ...)
    so neither always runs right after the other. ``backend`` is one label for both or a (candidate,
    reference) pair.

    Example: ``measure_interleaved(openvino_run, ort_run, rounds=20, calls_per_round=10, warmup=5,
    backend=("openvino", "onnxruntime"), threads=1, batch=1).ratio``.
    """
    if rounds < 1 or calls_per_round < 1 or warmup < 0:
        raise ConfigError(
            f"rounds and calls_per_round must be >= 1 and warmup >= 0, got rounds={rounds}, "
            f"calls_per_round={calls_per_round}, warmup={warmup}."
        )
    candidate_backend, reference_backend = (backend, backend) if isinstance(backend, str) else backend
    for _ in range(warmup):
        candidate()
        reference()
    runs = {"candidate": candidate, "reference": reference}
    samples: dict[str, list[float]] = {"candidate": [], "reference": []}
    round_ratios: list[float] = []
    for round_index in range(rounds):
        order = ("candidate", "reference") if round_index % 2 == 0 else ("reference", "candidate")
        medians = {}
        for name in order:
            run, round_samples = runs[name], []
            for _ in range(calls_per_round):
                tick = time.perf_counter()
                run()
                round_samples.append((time.perf_counter() - tick) * 1000.0)
            samples[name].extend(round_samples)
            medians[name] = statistics.median(round_samples)
        round_ratios.append(_ratio(medians["candidate"], medians["reference"]))
    candidate_stats = _stats(
        samples["candidate"], backend=candidate_backend, threads=threads, batch=batch, warmup=warmup
    )
    reference_stats = _stats(
        samples["reference"], backend=reference_backend, threads=threads, batch=batch, warmup=warmup
    )
    return InterleavedStats(
        candidate=candidate_stats,
        reference=reference_stats,
        ratio_median=_ratio(candidate_stats.median_ms, reference_stats.median_ms),
        ratio_min=_ratio(candidate_stats.min_ms, reference_stats.min_ms),
        ratio_round_median=statistics.median(round_ratios),
        round_ratios=round_ratios,
        rounds=rounds,
        calls_per_round=calls_per_round,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("inf")
