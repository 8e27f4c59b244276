"""pipelines.deploy.routing_cost: the one-file MoE timed against its chosen experts alone (and a shared
trunk), on both engines."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import symmetry
from pipelines.deploy.routing_cost import measure_routing_overhead, routing_share
from pipelines.deploy.runtime import load_bundle
from pipelines.errors import ConfigError, DataError
from tests.pipelines_tests.deploy_tests.support import CALIBRATION


def test_overhead_is_measured_per_engine_and_batch(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    result = measure_routing_overhead(folder, images, batches=(1, 4), repeats=3, warmup=1)
    assert set(result) == {"onnxruntime", "openvino"}
    for engine, per_batch in result.items():
        assert set(per_batch) == {"batch_1", "batch_4"}
        for name, timing in per_batch.items():
            batch = int(name.split("_")[1])
            merged = timing["single_file"]
            assert merged["batch"] == batch and merged["min_ms"] <= merged["median_ms"]
            assert 0.0 < timing["network"]["min_ms"] <= timing["network"]["median_ms"]
            # top-2 of 2 experts: both run, so two calls, one of them taken off
            assert timing["calls"] == 2
            assert 0.0 < timing["call"]["min_ms"] < merged["min_ms"]  # an empty graph costs less
            assert 0.0 <= timing["routing_share"] <= 1.0 and 0.0 <= timing["routing_share_min"] <= 1.0
            assert ("folder" in timing) == (engine == "onnxruntime")


def test_a_shared_trunk_counts_as_network_not_routing(shared_bundle, data) -> None:
    _, folder = shared_bundle
    images = data[0][CALIBRATION:].numpy()
    bundle = load_bundle(folder)
    result = measure_routing_overhead(folder, images, batches=(1, 8), repeats=3, warmup=1)
    for per_batch in result.values():
        for name, timing in per_batch.items():
            batch = int(name.split("_")[1])
            chosen, _ = bundle.route(np.concatenate(symmetry.views(images[:batch], bundle.views)))
            # trunk and each used expert were called apart: all calls but one are taken off
            assert timing["calls"] == 1 + len(np.unique(chosen))
            assert 0.0 < timing["network"]["min_ms"] <= timing["network"]["median_ms"]
            network = timing["network"]["min_ms"] - (timing["calls"] - 1) * timing["call"]["min_ms"]
            share = min(1.0, max(0.0, 1.0 - network / timing["single_file"]["min_ms"]))
            assert timing["routing_share_min"] == pytest.approx(share)
            # the median share comes from the interleaved rounds' ratio to the same network
            assert 0.0 <= timing["routing_share"] <= 1.0 and timing["ratio"] > 0.0


def test_the_search_share_is_the_batch_1_share_of_one_engine(shared_bundle, data) -> None:
    _, folder = shared_bundle
    images = data[0][CALIBRATION:].numpy()
    share = routing_share(folder, images[:1], engine="onnxruntime", repeats=6, warmup=1)
    assert 0.0 <= share <= 1.0
    with pytest.raises(ConfigError, match="engine: unknown value .tensorrt."):
        routing_share(folder, images[:1], engine="tensorrt")


def test_bad_arguments_are_named(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    images = data[0][:4].numpy()
    with pytest.raises(ConfigError, match="engines: unknown value .tensorrt."):
        measure_routing_overhead(folder, images, engines=("tensorrt",))
    with pytest.raises(DataError, match="batch 64"):
        measure_routing_overhead(folder, images)
    with pytest.raises(ConfigError, match="batches"):
        measure_routing_overhead(folder, images, batches=(0,))
