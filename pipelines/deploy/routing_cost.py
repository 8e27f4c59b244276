"""What a bundle's one-file MoE (``model.onnx``) spends outside its experts: the merged file timed against
the sum of its chosen experts run alone on the rows routed to them (plus, for a shared-trunk bundle, the trunk
on the whole batch), on ONNX Runtime and on OpenVINO. The rest (gate, softmax, top-k, gathering, scattering,
views) is the routing overhead. Each separately timed file pays the engine's fixed cost of a call once (on
OpenVINO about as much as a small expert's compute), the merged file once in all: the extra calls are
measured on an empty graph and taken off. Torch-free."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipelines import symmetry
from pipelines.deploy.engines import ENGINES, as_array, open_model
from pipelines.deploy.manifest import file_names, read_manifest, trunk_file_name, verified
from pipelines.deploy.runtime import load_bundle
from pipelines.errors import ConfigError, DataError, unknown_name
from pipelines.timing import LatencyStats, measure_latency

__all__ = ["measure_routing_overhead"]


def _routed_rows(bundle, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(the view-expanded batch, what the experts read: that batch or the trunk's feature map of it, for
    each expert the rows routed there), routed by the bundle's own files with ONNX Runtime (OpenVINO's int8
    gate may round a near tie the other way)."""
    stacked = np.ascontiguousarray(np.concatenate(symmetry.views(images, bundle.views)))
    features = stacked if bundle.trunk is None else np.ascontiguousarray(bundle.trunk(stacked))
    if bundle.num_experts == 1:
        return stacked, features, [np.arange(len(stacked))]
    chosen, _ = bundle.route(stacked)
    routed = [np.nonzero((chosen == expert).any(axis=1))[0] for expert in range(bundle.num_experts)]
    return stacked, features, routed


def _call_probe(folder: Path, channels: int, height: int, width: int) -> Path:
    """An ONNX file that reads a (B, C, H, W) batch and does nothing with it (returns its shape): its
    latency is the engine's fixed cost of one call."""
    graph = helper.make_graph(
        [helper.make_node("Shape", ["input"], ["output"])],
        "call_probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.INT64, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hycomp")
    model.ir_version = 8
    path = Path(folder) / "call_probe.onnx"
    onnx.save(model, str(path))
    return path


def _timed(
    model, inputs: np.ndarray, backend: str, *, threads: int, warmup: int, repeats: int
) -> LatencyStats:
    return measure_latency(
        lambda: model(inputs),
        backend=backend,
        threads=threads,
        batch=len(inputs),
        warmup=warmup,
        repeats=repeats,
    )


def measure_routing_overhead(
    folder: Path,
    images: np.ndarray,
    *,
    threads: int = 1,
    batches: tuple[int, ...] = (1, 64),
    engines: tuple[str, ...] = ENGINES,
    repeats: int = 30,
    warmup: int = 5,
) -> dict:
    """For each engine and batch: latency of the bundle's ``model.onnx`` on the first ``batch`` images, the
    summed latencies of its chosen experts alone on the rows routed to each, and ``routing_share`` = 1 -
    network / merged (of the medians; ``routing_share_min`` of the minima): the share spent in gate, routing
    and views. A shared-layout bundle's trunk is network, not routing: it is timed on the view-expanded batch
    (``trunk``) and counted with the experts. network = trunk + experts - (files timed - 1) * ``call``, the
    latency of an empty graph: the merged file pays the engine's call cost once. On ONNX Runtime the
    per-expert folder with numpy routing (``OrtMoE``) is timed too, as ``folder``.

    Returns ``{engine: {"batch_<n>": {"single_file": stats, "experts": {"min_ms", "median_ms"},
    ["trunk": {"min_ms", "median_ms"}], "call": {"min_ms", "median_ms"}, "routing_share": float,
    "routing_share_min": float, ["folder": stats]}}}`` with ``stats`` from
    :func:`pipelines.timing.measure_latency`.
    """
    folder = Path(folder)
    for engine in engines:
        if engine not in ENGINES:
            raise unknown_name("engines", engine, ENGINES)
    if not batches or any(not isinstance(batch, int) or batch < 1 for batch in batches):
        raise ConfigError(f"batches: {batches!r} must be positive integers.")
    array = as_array(images)
    if len(array) < max(batches):
        raise DataError(
            f"images: batch {max(batches)} needs at least {max(batches)} images, got {len(array)}."
        )
    manifest = read_manifest(folder)
    _, expert_names = file_names(manifest.num_experts, manifest.precision)
    expert_paths = [verified(folder, name, manifest) for name in expert_names]
    shared = manifest.layout == "shared"
    trunk_path = verified(folder, trunk_file_name(manifest.precision), manifest) if shared else None
    merged_path = verified(folder, manifest.single_file, manifest)
    # loaded once: it routes every batch on every engine and is timed itself on ONNX Runtime
    glue = load_bundle(folder, threads=threads)
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        probe_path = _call_probe(Path(scratch), *array.shape[1:])
        probes = {engine: open_model(probe_path, engine, threads) for engine in engines}
    for engine in engines:
        merged = open_model(merged_path, engine, threads)
        experts = [open_model(path, engine, threads) for path in expert_paths]
        trunk = open_model(trunk_path, engine, threads) if trunk_path is not None else None
        label = f"{engine}-{manifest.precision}"
        timed = functools.partial(_timed, threads=threads, warmup=warmup, repeats=repeats)

        result[engine] = {}
        for batch in batches:
            batch_images = np.ascontiguousarray(array[:batch])
            timing = {"single_file": timed(merged, batch_images, f"{label} single file").as_dict()}
            stacked, features, routed = _routed_rows(glue, batch_images)
            parts = [timed(trunk, stacked, f"{label} trunk")] if trunk is not None else []
            if parts:
                timing["trunk"] = {"min_ms": parts[0].min_ms, "median_ms": parts[0].median_ms}
            experts_timed = [
                timed(expert, np.ascontiguousarray(features[rows]), f"{label} expert")
                for expert, rows in zip(experts, routed, strict=True)
                if rows.size
            ]
            timing["experts"] = {
                "min_ms": sum(stats.min_ms for stats in experts_timed),
                "median_ms": sum(stats.median_ms for stats in experts_timed),
            }
            parts += experts_timed
            call = timed(probes[engine], batch_images, f"{label} empty call")
            timing["call"] = {"min_ms": call.min_ms, "median_ms": call.median_ms}
            for statistic, key in (("median_ms", "routing_share"), ("min_ms", "routing_share_min")):
                # minima are the least disturbed by other load on the machine
                network = sum(getattr(stats, statistic) for stats in parts)
                network -= (len(parts) - 1) * getattr(call, statistic)
                # clipped: on tiny files under load the call cost taken off can exceed what they measured
                timing[key] = min(1.0, max(0.0, 1.0 - network / timing["single_file"][statistic]))
            if engine == "onnxruntime":
                timing["folder"] = timed(
                    glue, batch_images, f"{label} per-expert files + numpy routing"
                ).as_dict()
            result[engine][f"batch_{batch}"] = timing
    return result
