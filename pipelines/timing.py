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

__all__ = ["LatencyStats", "measure_latency", "cpu_description"]


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
    samples.sort()

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
