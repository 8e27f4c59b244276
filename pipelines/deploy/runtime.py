"""Runs a deployed bundle on a CPU engine (ONNX Runtime or OpenVINO, :mod:`.engines`) and numpy alone (no
torch): one engine model per ONNX file, the MoE's routing in numpy, and the latency of the whole call with the
shared harness.

Example::

    bundle = load_bundle(Path("bundle"), threads=2, engine="openvino")
    logits = bundle(images)  # float32 (B, C, H, W), normalized as the manifest says
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipelines import symmetry
from pipelines.deploy.engines import ENGINES, EngineModel, OrtModel, as_array, open_model
from pipelines.deploy.manifest import (
    PRECISIONS,
    Manifest,
    file_names,
    read_manifest,
    trunk_file_name,
    verified,
)
from pipelines.errors import ConfigError, DataError, unknown_name
from pipelines.timing import measure_latency

__all__ = [
    "BundleMoE",
    "OrtModel",
    "OrtMoE",
    "as_array",
    "backend_label",
    "load_bundle",
    "load_single_file",
    "measure_moe_latency",
]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class BundleMoE:
    """A Mixture-of-Experts served by one CPU engine and numpy; matches ``MixtureOfExperts.forward`` in eval mode.

    Each call runs the gate on the whole batch, then each used expert once on the samples routed to it.
    With ``views`` > 1 the batch is first expanded into that many symmetric views (the order of
    :mod:`pipelines.symmetry`) and the logits of a sample's views are averaged.
    ``last_timing`` holds the seconds of the last call: ``experts`` (expert sessions only),
    ``gate_and_routing`` (everything else: gate, softmax, top-k, gathering and combining) and ``total``.
    With a ``trunk`` (the shared layout) the trunk runs once on the (view-expanded) batch, the gate and the
    experts on its feature map; ``last_timing["trunk"]`` holds its seconds (also outside the other two).
    """

    def __init__(
        self,
        gate: EngineModel,
        experts: list[EngineModel],
        top_k: int,
        views: int = 1,
        trunk: EngineModel | None = None,
    ) -> None:
        if not experts:
            raise ConfigError("experts: the list is empty; a BundleMoE needs at least one expert.")
        if not 1 <= top_k <= len(experts):
            raise ConfigError(f"top_k: {top_k} must be between 1 and the number of experts ({len(experts)}).")
        gate_outputs = gate.num_outputs
        if gate_outputs is not None and gate_outputs != len(experts):
            raise ConfigError(
                f"gate: it scores {gate_outputs} experts but {len(experts)} experts were given."
            )
        symmetry.check_views(views, "views")
        self.gate = gate
        self.experts = list(experts)
        self.trunk = trunk
        self.top_k = top_k
        self.views = views
        self.last_timing: dict[str, float] = {}
        self.manifest: Manifest | None = None  # set by load_bundle

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def _models(self) -> tuple[EngineModel, ...]:
        return (self.gate, *self.experts, *([self.trunk] if self.trunk is not None else []))

    @property
    def precision(self) -> str:
        """``int8`` or ``fp32`` when all sessions agree, else ``mixed``."""
        kinds = {model.precision for model in self._models}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def threads(self) -> int:
        """The intra-op thread count of the models (``ConfigError`` if they differ)."""
        counts = {model.threads for model in self._models}
        if len(counts) != 1:
            raise ConfigError(
                f"BundleMoE models use different thread counts {sorted(counts)}; load them alike."
            )
        return counts.pop()

    @property
    def engine(self) -> str:
        """The engine of the models (``ConfigError`` if they differ)."""
        return self._shared("engine")

    @property
    def version(self) -> str:
        """The engine's package version."""
        return self._shared("version")

    def _shared(self, attribute: str) -> str:
        values = {getattr(model, attribute) for model in self._models}
        if len(values) != 1:
            raise ConfigError(
                f"BundleMoE models use different {attribute}s {sorted(values)}; load them with one engine."
            )
        return values.pop()

    def label(self) -> str:
        """e.g. ``openvino 2026.4.1 int8, 1 thread(s)``."""
        return f"{self.engine} {self.version} {self.precision}, {self.threads} thread(s)"

    def route(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chosen expert ids (B, k) int64, best first; combine weights (B, k) float32, rows sum to 1)."""
        return self._route(self.trunk(images) if self.trunk is not None else images)

    def _route(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`route` on what the gate reads (the images, or the trunk's feature map)."""
        probabilities = softmax(self.gate(inputs))
        # A stable sort of -p gives torch.topk's order (descending, lowest index first on ties).
        chosen = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        top_values = np.take_along_axis(probabilities, chosen, axis=1)
        weights = (top_values / top_values.sum(axis=1, keepdims=True)).astype(np.float32)
        return chosen.astype(np.int64), weights

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) -> combined logits (B, classes), averaged over the test-time views."""
        started = time.perf_counter()
        images = as_array(images)
        if self.views == 1 or len(images) == 0:
            return self._routed(images, started)
        stacked = np.ascontiguousarray(np.concatenate(symmetry.views(images, self.views)))
        output = self._routed(stacked, started)
        return output.reshape(self.views, len(images), -1).mean(axis=0)

    def _routed(self, images: np.ndarray, started: float) -> np.ndarray:
        trunk_seconds = 0.0
        if self.trunk is not None:
            tick = time.perf_counter()
            images = self.trunk(images)  # the feature map the gate and the experts read
            trunk_seconds = time.perf_counter() - tick
        if self.num_experts == 1:  # the gate has one choice: skip it, as MixtureOfExperts.forward does
            tick = time.perf_counter()
            output = self.experts[0](images)
            expert_seconds = time.perf_counter() - tick
            total = time.perf_counter() - started
            self._record_timing(total, expert_seconds, trunk_seconds)
            return output
        chosen, weights = self._route(images)
        expert_seconds = 0.0
        output: np.ndarray | None = None
        for expert_id, expert in enumerate(self.experts):
            rows, slots = np.nonzero(chosen == expert_id)
            if rows.size == 0:
                continue
            batch = images[rows]
            tick = time.perf_counter()
            expert_out = expert(batch)
            expert_seconds += time.perf_counter() - tick
            if output is None:
                output = np.zeros((len(images), expert_out.shape[1]), dtype=np.float32)
            # top-k picks distinct experts, so a row appears at most once per expert: plain += is safe.
            output[rows] += expert_out * weights[rows, slots][:, None]
        total = time.perf_counter() - started
        self._record_timing(total, expert_seconds, trunk_seconds)
        if output is None:  # an empty batch: no expert ran
            output = np.zeros((0, self.experts[0].num_outputs or 0), dtype=np.float32)
        return output

    def _record_timing(self, total: float, expert_seconds: float, trunk_seconds: float) -> None:
        self.last_timing = {
            "gate_and_routing": total - expert_seconds - trunk_seconds,
            "experts": expert_seconds,
            "total": total,
            **({"trunk": trunk_seconds} if self.trunk is not None else {}),
        }

    def __repr__(self) -> str:
        return (
            f"BundleMoE(num_experts={self.num_experts}, top_k={self.top_k}, views={self.views}, "
            f"precision={self.precision!r}, shared_trunk={self.trunk is not None})"
        )


OrtMoE = BundleMoE  # the name before OpenVINO joined; kept for callers


def backend_label(model: EngineModel | BundleMoE) -> str:
    """The engine, its version and the precision, e.g. ``openvino 2026.4.1 int8 (CPU)``."""
    return f"{model.engine} {model.version} {model.precision} (CPU)"


def measure_moe_latency(
    bundle: BundleMoE | EngineModel,
    images: np.ndarray,
    *,
    threads: int,
    batch: int,
    repeats: int = 30,
    warmup: int = 5,
) -> dict:
    """Latency of ``bundle`` on the first ``batch`` of ``images`` with the shared harness, plus the median
    share of each call spent outside the experts (gate and routing).

    ``threads`` must equal the thread count the models were created with (it is recorded, not set).
    A plain :class:`~pipelines.deploy.engines.EngineModel` (a single CNN) is timed the same way; its
    ``routing_share`` is ``None``. Returns ``{"latency": LatencyStats.as_dict(), "routing_share": float | None,
    "engine": str, "engine_version": str, "precision": str, "threads": int, "batch": int}``.
    """
    if batch < 1:
        raise ConfigError(f"batch: {batch} must be >= 1.")
    session_threads = bundle.threads
    if threads != session_threads:
        raise ConfigError(
            f"threads: {threads} differs from the {session_threads} thread(s) the models were created with; "
            f"load the bundle with threads={threads} or pass threads={session_threads}."
        )
    array = as_array(images)
    if len(array) < batch:
        raise DataError(f"images: batch {batch} needs at least {batch} images, got {len(array)}.")
    array = np.ascontiguousarray(array[:batch])
    shares: list[float] = []

    def run() -> object:
        output = bundle(array)
        if isinstance(bundle, BundleMoE):
            timing = bundle.last_timing
            shares.append(timing["gate_and_routing"] / timing["total"] if timing["total"] > 0 else 0.0)
        return output

    stats = measure_latency(
        run, backend=backend_label(bundle), threads=threads, batch=batch, warmup=warmup, repeats=repeats
    )
    routing_share = float(np.median(shares[warmup:])) if shares else None
    return {
        "latency": stats.as_dict(),
        "routing_share": routing_share,
        "engine": bundle.engine,
        "engine_version": bundle.version,
        "precision": bundle.precision,
        "threads": threads,
        "batch": batch,
    }


def load_bundle(
    folder: Path, threads: int = 1, precision: str | None = None, engine: str = "onnxruntime"
) -> BundleMoE:
    """Load a bundle written by :func:`pipelines.deploy.bundle.deploy_moe` into ``engine`` (one of
    ``ENGINES``) after checking its manifest and every ONNX file against its SHA-256. ``precision`` picks
    ``fp32`` or ``int8`` files (default: the manifest's).
    Example: ``bundle = load_bundle(Path("bundle"), threads=2, engine="openvino")``."""
    folder = Path(folder)
    if engine not in ENGINES:
        raise unknown_name("engine", engine, ENGINES)
    if precision is not None and precision not in PRECISIONS:
        raise unknown_name("precision", precision, PRECISIONS)
    manifest = read_manifest(folder)
    chosen = precision or manifest.precision
    gate_name, expert_names = file_names(manifest.num_experts, chosen)
    trunk_names = [trunk_file_name(chosen)] if manifest.layout == "shared" else []
    if chosen != manifest.precision and any(
        name not in manifest.files for name in (gate_name, *expert_names, *trunk_names)
    ):
        raise ConfigError(
            f"precision: the bundle in {folder} has no {chosen} files (it was deployed as "
            f"{manifest.precision}); load it with precision={manifest.precision!r} or re-deploy."
        )
    gate = open_model(verified(folder, gate_name, manifest), engine, threads)
    experts = [open_model(verified(folder, name, manifest), engine, threads) for name in expert_names]
    trunk = open_model(verified(folder, trunk_names[0], manifest), engine, threads) if trunk_names else None
    bundle = BundleMoE(gate, experts, manifest.top_k, manifest.views, trunk=trunk)
    bundle.manifest = manifest
    return bundle


def load_single_file(folder: Path, threads: int = 1, engine: str = "onnxruntime") -> EngineModel:
    """The bundle's ``model.onnx`` (the whole MoE in one ONNX file, no numpy routing) on ``engine``, after
    checking the manifest and the file's SHA-256. Example: ``logits = load_single_file(Path("bundle"))(images)``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return open_model(verified(folder, manifest.single_file, manifest), engine, threads)
