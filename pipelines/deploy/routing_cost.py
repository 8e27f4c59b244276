"""What a bundle's one-file MoE (``model.onnx``) spends outside its experts: the merged file timed against
the sum of its chosen experts run alone on the rows routed to them (plus, for a shared-trunk bundle, the trunk
on the whole batch), on ONNX Runtime and on OpenVINO. The rest (gate, softmax, top-k, gathering, scattering,
views) is the routing overhead. Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import symmetry
from pipelines.deploy.engines import ENGINES, as_array, open_model
from pipelines.deploy.manifest import file_names, read_manifest, trunk_file_name, verified
from pipelines.deploy.runtime import load_bundle
from pipelines.errors import ConfigError, DataError, unknown_name
from pipelines.timing import measure_latency

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
    experts / merged (of the medians; ``routing_share_min`` of the minima): the share spent in gate, routing
    and views. A shared-layout bundle's trunk is network, not routing: it is timed on the view-expanded batch
    (``trunk``) and counted with the experts. On ONNX Runtime the per-expert folder with numpy routing
    (``OrtMoE``) is timed too, as ``folder``.

    Returns ``{engine: {"batch_<n>": {"single_file": stats, "experts": {"min_ms", "median_ms"},
    ["trunk": {"min_ms", "median_ms"}], "routing_share": float, "routing_share_min": float,
    ["folder": stats]}}}`` with ``stats`` from :func:`pipelines.timing.measure_latency`.
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
    for engine in engines:
        merged = open_model(merged_path, engine, threads)
        experts = [open_model(path, engine, threads) for path in expert_paths]
        trunk = open_model(trunk_path, engine, threads) if trunk_path is not None else None
        label = f"{engine}-{manifest.precision}"
        result[engine] = {}
        for batch in batches:
            batch_images = np.ascontiguousarray(array[:batch])
            timing = {
                "single_file": measure_latency(
                    lambda model=merged, inputs=batch_images: model(inputs),
                    backend=f"{label} single file",
                    threads=threads,
                    batch=batch,
                    warmup=warmup,
                    repeats=repeats,
                ).as_dict()
            }
            stacked, features, routed = _routed_rows(glue, batch_images)
            network_min, network_median = 0.0, 0.0
            if trunk is not None:
                stats = measure_latency(
                    lambda model=trunk, inputs=stacked: model(inputs),
                    backend=f"{label} trunk",
                    threads=threads,
                    batch=len(stacked),
                    warmup=warmup,
                    repeats=repeats,
                )
                timing["trunk"] = {"min_ms": stats.min_ms, "median_ms": stats.median_ms}
                network_min, network_median = stats.min_ms, stats.median_ms
            expert_min, expert_median = 0.0, 0.0
            for expert, rows in zip(experts, routed, strict=True):
                if rows.size == 0:
                    continue
                inputs = np.ascontiguousarray(features[rows])
                stats = measure_latency(
                    lambda model=expert, inputs=inputs: model(inputs),
                    backend=f"{label} expert",
                    threads=threads,
                    batch=len(inputs),
                    warmup=warmup,
                    repeats=repeats,
                )
                expert_min += stats.min_ms
                expert_median += stats.median_ms
            timing["experts"] = {"min_ms": expert_min, "median_ms": expert_median}
            network_min, network_median = network_min + expert_min, network_median + expert_median
            timing["routing_share"] = max(0.0, 1.0 - network_median / timing["single_file"]["median_ms"])
            # minima are the least disturbed by other load on the machine
            timing["routing_share_min"] = max(0.0, 1.0 - network_min / timing["single_file"]["min_ms"])
            if engine == "onnxruntime":
                timing["folder"] = measure_latency(
                    lambda model=glue, inputs=batch_images: model(inputs),
                    backend=f"{label} per-expert files + numpy routing",
                    threads=threads,
                    batch=batch,
                    warmup=warmup,
                    repeats=repeats,
                ).as_dict()
            result[engine][f"batch_{batch}"] = timing
    return result
