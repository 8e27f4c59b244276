"""The latency model's lookup table: a kernel (op, precision, shapes, batch) and its measured milliseconds,
with per-call overheads, kept per CPU, engine and thread count (:func:`load_table` refuses another CPU's)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.errors import ConfigError, DataError, unknown_name
from pipelines.timing import cpu_description

__all__ = ["Kernel", "LatencyTable", "load_table", "default_table_path", "engine_version", "TABLE_FORMAT"]

TABLE_FORMAT = 1
_ENGINES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Kernel:
    """One fused kernel: what the engine runs as one step, keyed by everything that sets its time.

    ``op``: conv, gemm, add, pool (GlobalAveragePool / MaxPool / AveragePool), reshape, quantize,
    dequantize, or the ONNX op type of anything else. ``precision``: fp32, int8 (uint8 activations x int8
    weights) or int8-u8w (uint8 weights, the slower exact kernels of :mod:`pipelines.deploy.int8`).
    ``fused``: what rides along, e.g. ``add+relu`` for an fp32 conv with its residual sum and ReLU.
    """

    op: str
    precision: str
    in_shape: tuple[int, ...]  # (C, H, W) or (features,) without the batch
    out_channels: int = 0
    kernel: int = 0
    stride: int = 1
    groups: int = 1
    pads: int = 0
    fused: str = ""
    batch: int = 1

    def key(self) -> str:
        shape = "x".join(map(str, self.in_shape))
        return (
            f"{self.op}|{self.precision}|in={shape}|out={self.out_channels}|k={self.kernel}|s={self.stride}"
            f"|g={self.groups}|p={self.pads}|f={self.fused}|b={self.batch}"
        )

    @classmethod
    def from_key(cls, key: str) -> Kernel:
        parts = key.split("|")
        values = dict(part.split("=", 1) for part in parts[2:])
        return cls(
            op=parts[0],
            precision=parts[1],
            in_shape=tuple(int(x) for x in values["in"].split("x") if x),
            out_channels=int(values["out"]),
            kernel=int(values["k"]),
            stride=int(values["s"]),
            groups=int(values["g"]),
            pads=int(values["p"]),
            fused=values["f"],
            batch=int(values["b"]),
        )

    def out_shape(self) -> tuple[int, ...]:
        if self.op == "conv":
            _, height, width = self.in_shape
            size = [(n + 2 * self.pads - self.kernel) // self.stride + 1 for n in (height, width)]
            return (self.out_channels, *size)
        if self.op == "gemm":
            return (self.out_channels,)
        if self.op == "pool" and self.fused == "global":
            return (self.in_shape[0], 1, 1)
        if self.op == "pool":
            _, height, width = self.in_shape
            return (
                self.in_shape[0],
                *[(n + 2 * self.pads - self.kernel) // self.stride + 1 for n in (height, width)],
            )
        if self.op == "reshape":
            return (int(np.prod(self.in_shape)),)
        return self.in_shape

    def features(self) -> tuple[float, float]:
        """(MACs, activation elements read and written): what the interpolation of a missing key uses."""
        elements = float(np.prod(self.in_shape) + np.prod(self.out_shape())) * self.batch
        if self.op == "conv":
            per_output = self.in_shape[0] // self.groups * self.kernel * self.kernel
            return float(np.prod(self.out_shape())) * per_output * self.batch, elements
        if self.op == "gemm":
            return float(self.in_shape[0] * self.out_channels * self.batch), elements
        return 0.0, elements


def engine_version(engine: str) -> str:
    if engine not in _ENGINES:
        raise unknown_name("engine", engine, _ENGINES)
    from importlib import metadata

    try:
        return metadata.version(engine)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"engine: {engine!r} is not installed; install it or pick another engine."
        ) from None


@dataclass
class LatencyTable:
    """Per-kernel latencies (ms) and per-call overheads measured on one CPU with one engine and thread count.

    ``overhead_ms``: ``session`` (one engine call of an almost empty model), ``moe_single`` (what the
    MoE runtime adds around a one-expert call), ``routing`` (gate softmax, top-k and combining),
    ``per_expert_call`` and the test-time views' stacking and mean (``views`` behind a gate,
    ``views_single`` for one net).
    """

    cpu: str
    engine: str
    engine_version: str
    threads: int
    overhead_ms: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    format_version: int = TABLE_FORMAT

    def save(self, path: Path | None = None) -> Path:
        path = Path(path or self.path or "")
        if not path.name:
            raise ConfigError("path: the latency table has no file; pass one to save().")
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {key: value for key, value in asdict(self).items() if key != "path"}
        record["kernels"] = dict(sorted(self.kernels.items()))
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(record, indent=1))
        scratch.replace(path)
        self.path = path
        return path

    def interpolate(self, kernel: Kernel) -> float:
        """The latency of a key the table lacks: a least-squares line ``a + b * MACs + c * elements`` fitted
        on the table's kernels of the same op and precision (at least three of them; coefficients kept
        non-negative), else the nearest same-op kernel scaled by MACs (or elements), else 0."""
        same = [
            Kernel.from_key(key)
            for key in self.kernels
            if key.split("|")[:2] == [kernel.op, kernel.precision]
        ]
        macs, elements = kernel.features()
        if len(same) >= 3:
            rows = np.array([[1.0, *other.features()] for other in same])
            times = np.array([self.kernels[other.key()] for other in same])
            scales = np.maximum(rows.max(axis=0), 1.0)
            coefficients, *_ = np.linalg.lstsq(rows / scales, times, rcond=None)
            coefficients = np.maximum(coefficients, 0.0) / scales
            return float(coefficients @ np.array([1.0, macs, elements]))
        if same:

            def distance(other: Kernel) -> float:
                other_macs, other_elements = other.features()
                return abs(np.log1p(other_macs) - np.log1p(macs)) + abs(
                    np.log1p(other_elements) - np.log1p(elements)
                )

            nearest = min(same, key=distance)
            nearest_macs, nearest_elements = nearest.features()
            ratio = macs / nearest_macs if nearest_macs else elements / max(nearest_elements, 1.0)
            return self.kernels[nearest.key()] * ratio
        return 0.0

    def latency(self, kernel: Kernel) -> float:
        value = self.kernels.get(kernel.key())
        return self.interpolate(kernel) if value is None else value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def default_table_path(root: Path, engine: str, threads: int) -> Path:
    """``<root>/profiles/<cpu>-<engine>-<version>-t<threads>.json``: one table per CPU, engine and threads."""
    import hashlib

    cpu = cpu_description()
    digest = hashlib.sha256(cpu.encode()).hexdigest()[
        :8
    ]  # the slug is cut short; the digest tells CPUs apart
    name = f"{_slug(cpu)[:40]}-{digest}-{engine}-{engine_version(engine)}-t{threads}.json"
    return Path(root) / "profiles" / name


def load_table(
    path: Path, engine: str = "onnxruntime", threads: int = 1, *, any_cpu: bool = False, create: bool = True
) -> LatencyTable:
    """The table at ``path`` (a new empty one for this machine when absent and ``create``).

    A table measured on another CPU or engine version predicts another machine: refused unless
    ``any_cpu`` (a deliberate cross-device prediction; missing kernels are then interpolated, never timed).
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise DataError(f"profile: {path} does not exist; run `hycomp profile` to make it.")
        return LatencyTable(cpu_description(), engine, engine_version(engine), threads, path=path)
    try:
        record = json.loads(path.read_text())
        table = LatencyTable(**{key: record[key] for key in ("cpu", "engine", "engine_version", "threads")})
        table.overhead_ms = {key: float(value) for key, value in record["overhead_ms"].items()}
        table.kernels = {key: float(value) for key, value in record["kernels"].items()}
        table.format_version = int(record["format_version"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"profile: {path} is not a latency table ({type(error).__name__}: {error}); delete it and run "
            "`hycomp profile` again."
        ) from None
    table.path = path
    if table.format_version != TABLE_FORMAT:
        raise DataError(
            f"profile: {path} has format {table.format_version}, expected {TABLE_FORMAT}; re-run `hycomp profile`."
        )
    if (table.engine, table.threads) != (engine, threads):
        raise ConfigError(
            f"profile: {path} was measured with {table.engine}, {table.threads} thread(s), not {engine}, "
            f"{threads} thread(s); run `hycomp profile --engine {engine} --threads {threads}`."
        )
    here = (cpu_description(), engine_version(engine))
    if not any_cpu and (table.cpu, table.engine_version) != here:
        raise ConfigError(
            f"profile: {path} was measured on {table.cpu!r} with {engine} {table.engine_version}, but this "
            f"machine is {here[0]!r} with {engine} {here[1]}. Run `hycomp profile` on this machine, or, to "
            "predict that other device on purpose, pass the file with --profile FILE --any-cpu "
            "(measure.profile and measure.profile_any_cpu: true in a space)."
        )
    return table
