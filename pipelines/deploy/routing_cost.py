"""What a bundle's one-file MoE (``model.onnx``) spends outside its experts: the merged file timed, in
alternating rounds, against its network alone (for a shared-trunk bundle the trunk on the whole batch, then
its chosen experts on the rows routed to them), on ONNX Runtime and on OpenVINO. The rest (gate, softmax,
top-k, gathering, scattering, views) is the routing overhead. Each separately called file pays the engine's
fixed cost of a call (on OpenVINO about as much as a small expert's compute), the merged file once in all:
the extra calls are measured on an empty graph and taken off. Interleaving makes the share a ratio of runs
that saw the same load, so the search can measure it beside a training worker. Torch-free."""

from __future__ import annotations

import functools
import math
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
from pipelines.timing import LatencyStats, measure_interleaved, measure_latency

__all__ = ["measure_routing_overhead", "routing_share"]


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


def _min_median(stats: LatencyStats) -> dict[str, float]:
    return {"min_ms": stats.min_ms, "median_ms": stats.median_ms}


def _share(
    merged,
    parts: list[tuple[object, np.ndarray]],
    probe,
    images: np.ndarray,
    *,
    label: str,
    threads: int,
    rounds: int,
    calls_per_round: int,
    warmup: int,
) -> dict:
    """``merged`` on ``images`` timed interleaved with the network alone (each ``(model, inputs)`` of
    ``parts`` called in turn) and, when that is more than one call, the empty ``probe`` interleaved with the
    network too: both are ratios to the same network, so load that slows all of them cancels out.
    routing share = 1 - (network - extra calls) / merged."""

    def network() -> None:
        for model, inputs in parts:
            model(inputs)

    interleaved = functools.partial(
        measure_interleaved,
        rounds=rounds,
        calls_per_round=calls_per_round,
        warmup=warmup,
        threads=threads,
        batch=len(images),
    )
    against = interleaved(
        lambda: merged(images), network, backend=(f"{label} model.onnx", f"{label} network")
    )
    extra = len(parts) - 1  # calls the merged file does not pay
    call = (
        interleaved(lambda: probe(images), network, backend=(f"{label} empty call", f"{label} network"))
        if extra
        else None
    )
    call_ratio = call.ratio if call is not None else 0.0  # one call's cost / the network's
    call_min = call.candidate.min_ms if call is not None else 0.0
    shares = {
        # round-median ratios: network-alone / merged = (1 - extra x call ratio) / (merged / network)
        "routing_share": 1.0 - (1.0 - extra * call_ratio) / against.ratio,
        # minima are the least disturbed by other load on the machine
        "routing_share_min": 1.0 - (against.reference.min_ms - extra * call_min) / against.candidate.min_ms,
    }
    timing = {
        "single_file": against.candidate.as_dict(),
        "network": _min_median(against.reference),
        "calls": len(parts),
        "ratio": against.ratio,
        # clipped: on tiny files under load the call cost taken off can exceed what they measured
        **{key: min(1.0, max(0.0, value)) for key, value in shares.items()},
    }
    if call is not None:
        timing["call"] = _min_median(call.candidate)
    return timing


def _parts(glue, trunk, experts: list, images: np.ndarray) -> list[tuple[object, np.ndarray]]:
    """What the network alone runs on ``images``: the trunk (shared layout) on the view-expanded batch, then
    each used expert on the rows routed to it."""
    stacked, features, routed = _routed_rows(glue, images)
    parts = [(trunk, stacked)] if trunk is not None else []
    return parts + [
        (expert, np.ascontiguousarray(features[rows]))
        for expert, rows in zip(experts, routed, strict=True)
        if rows.size
    ]


class _Files:
    """A bundle's merged file, trunk and experts opened on one engine, with the call probe."""

    def __init__(self, folder: Path, engine: str, threads: int, probe_path: Path) -> None:
        manifest = read_manifest(folder)
        _, expert_names = file_names(manifest.num_experts, manifest.precision)
        shared = manifest.layout == "shared"
        self.layout = manifest.layout
        self.label = f"{engine}-{manifest.precision}"
        self.merged = open_model(verified(folder, manifest.single_file, manifest), engine, threads)
        self.experts = [
            open_model(verified(folder, name, manifest), engine, threads) for name in expert_names
        ]
        trunk_name = trunk_file_name(manifest.precision)
        self.trunk = open_model(verified(folder, trunk_name, manifest), engine, threads) if shared else None
        self.probe = open_model(probe_path, engine, threads)


def _rounds(repeats: int, rounds: int | None) -> tuple[int, int]:
    rounds = min(15, repeats) if rounds is None else rounds
    return rounds, math.ceil(repeats / rounds)


def measure_routing_overhead(
    folder: Path,
    images: np.ndarray,
    *,
    threads: int = 1,
    batches: tuple[int, ...] = (1, 64),
    engines: tuple[str, ...] = ENGINES,
    repeats: int = 30,
    warmup: int = 5,
    rounds: int | None = None,
    time_glue: bool = True,
) -> dict:
    """For each engine and batch: the bundle's ``model.onnx`` on the first ``batch`` images timed in
    alternating rounds against its network alone (a shared trunk on the view-expanded batch, then each
    chosen expert on the rows routed to it, each file called apart), and ``routing_share`` = 1 - network /
    merged: the share spent in gate, top-k, gathering, combining and views. Every separately called file
    pays the engine's fixed cost of a call, which the merged file pays once: an empty graph, interleaved
    with the network too, gives that cost, taken off all calls but one. ``routing_share`` comes from the
    median per-round ratios, ``routing_share_min`` from the minima. ``repeats`` calls of each file in all,
    in ``rounds`` rounds (default ``min(15, repeats)``). With ``time_glue``, on ONNX Runtime the per-expert folder
    with numpy routing (``OrtMoE``) is timed too, as ``folder``.

    Returns ``{engine: {"batch_<n>": {"single_file": stats, "network": {"min_ms", "median_ms"}, "calls": int,
    "layout": str,
    ["call": {"min_ms", "median_ms"}], "ratio": float, "routing_share": float, "routing_share_min": float,
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
    rounds, calls_per_round = _rounds(repeats, rounds)
    # loaded once: it routes every batch on every engine and is timed itself on ONNX Runtime
    glue = load_bundle(folder, threads=threads)
    result: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        probe_path = _call_probe(Path(scratch), *array.shape[1:])
        for engine in engines:
            # one engine's sessions at a time, released before the next engine's load
            opened = _Files(folder, engine, threads, probe_path)
            result[engine] = {}
            for batch in batches:
                batch_images = np.ascontiguousarray(array[:batch])
                timing = _share(
                    opened.merged,
                    _parts(glue, opened.trunk, opened.experts, batch_images),
                    opened.probe,
                    batch_images,
                    label=opened.label,
                    threads=threads,
                    rounds=rounds,
                    calls_per_round=calls_per_round,
                    warmup=warmup,
                )
                timing["layout"] = opened.layout
                if time_glue and engine == "onnxruntime":
                    timing["folder"] = _timed(
                        glue,
                        batch_images,
                        f"{opened.label} per-expert files + numpy routing",
                        threads=threads,
                        warmup=warmup,
                        repeats=repeats,
                    ).as_dict()
                result[engine][f"batch_{batch}"] = timing
            del opened
    return result


def routing_share(
    folder: Path,
    image: np.ndarray,
    *,
    engine: str,
    threads: int = 1,
    repeats: int = 150,
    warmup: int = 5,
    rounds: int | None = None,
) -> float:
    """The batch-1 ``routing_share`` of :func:`measure_routing_overhead` on one engine for one ``image``
    (shape (1, C, H, W)): what the search records per multi-expert trial."""
    if engine not in ENGINES:
        raise unknown_name("engine", engine, ENGINES)
    overhead = measure_routing_overhead(
        folder,
        as_array(image)[:1],
        threads=threads,
        batches=(1,),
        engines=(engine,),
        repeats=repeats,
        warmup=warmup,
        rounds=rounds,
        time_glue=False,
    )
    return overhead[engine]["batch_1"]["routing_share"]
