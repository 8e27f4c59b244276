"""The latency model: kernel detection on small ONNX graphs, prediction = overhead + sum of kernels, the
table's round trip through its file and its refusal of a table made on another CPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipelines.deploy.kernel_profile import kernel_model, profile_kernels
from pipelines.deploy.latency_model import kernels_of, predict_latency
from pipelines.deploy.latency_table import Kernel, LatencyTable, load_table
from pipelines.errors import ConfigError
from pipelines.timing import cpu_description


def residual_model(path):
    """Conv-ReLU -> Conv -> Add(skip) -> ReLU -> GlobalAveragePool -> Flatten -> Gemm, fp32, 4 x 8 x 8."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), name)
        for name in ("w1", "w2")
    ] + [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "fc")]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fp32_kernels_fuse_conv_add_relu(tmp_path):
    kernels = kernels_of(residual_model(tmp_path / "m.onnx"))
    assert [(kernel.op, kernel.fused) for kernel in kernels] == [
        ("conv", "relu"),
        ("conv", "add+relu"),
        ("pool", "global"),
        ("reshape", ""),
        ("gemm", ""),
        ("reorder", ""),
        ("reorder", ""),
    ]
    assert kernels[0].key() == "conv|fp32|in=4x8x8|out=4|k=3|s=1|g=1|p=1|f=relu|b=1"
    assert kernels[4].out_channels == 3 and kernels[4].in_shape == (4,)
    assert Kernel.from_key(kernels[1].key()) == kernels[1]


def test_int8_qdq_conv_is_one_kernel(tmp_path):
    conv = Kernel("conv", "int8", (4, 8, 8), out_channels=8, kernel=3, stride=2, pads=1)
    path = tmp_path / "k.onnx"
    onnx.save(kernel_model(conv), str(path))
    kernels = kernels_of(path)
    assert [kernel.op for kernel in kernels] == ["quantize", "conv", "dequantize"]
    assert kernels[1] == conv  # the one-kernel model parses back to the key it was built from
    assert kernels[2].in_shape == (8, 4, 4)


def test_prediction_is_overhead_plus_kernel_sum(tmp_path):
    path = residual_model(tmp_path / "m.onnx")
    table = LatencyTable(cpu_description(), "onnxruntime", "x", 1, overhead_ms={"session": 0.5})
    kernels = kernels_of(path)
    table.kernels = {kernel.key(): 0.1 * (index + 1) for index, kernel in enumerate(kernels)}
    expected = 0.5 + sum(table.kernels[kernel.key()] for kernel in kernels)  # equal keys: one entry
    assert len(table.kernels) == len(kernels) - 1  # the reorders in and out share a (4, 8, 8) key
    assert predict_latency(path, table) == pytest.approx(expected)


def test_missing_key_is_interpolated_from_the_same_op():
    table = LatencyTable(cpu_description(), "onnxruntime", "x", 1)
    for channels in (4, 8, 16, 32):
        kernel = Kernel("conv", "int8", (channels, 8, 8), out_channels=channels, kernel=3, pads=1)
        table.kernels[kernel.key()] = 1e-6 * kernel.features()[0]  # time proportional to MACs
    unseen = Kernel("conv", "int8", (12, 8, 8), out_channels=12, kernel=3, pads=1)
    assert table.latency(unseen) == pytest.approx(1e-6 * unseen.features()[0], rel=0.05)
    assert table.latency(Kernel("add", "int8", (4, 8, 8))) == 0.0  # no kernel of that op: nothing to scale


def test_table_round_trips_and_is_not_retimed(tmp_path):
    from pipelines.deploy.latency_table import engine_version

    path = tmp_path / "table.json"
    table = load_table(path, "onnxruntime", 1)
    kernels = [
        Kernel("conv", "int8", (4, 8, 8), out_channels=4, kernel=3, pads=1),
        Kernel("conv", "fp32", (4, 8, 8), out_channels=4, kernel=3, pads=1, fused="relu"),
    ]
    assert profile_kernels(table, kernels, repeats=3) == 2
    again = load_table(path, "onnxruntime", 1)
    assert again.kernels == table.kernels and again.overhead_ms == table.overhead_ms
    assert set(again.overhead_ms) == {
        "session",
        "moe_single",
        "routing",
        "per_expert_call",
        "views",
        "views_single",
    }
    assert again.cpu == cpu_description() and again.engine_version == engine_version("onnxruntime")
    assert profile_kernels(again, kernels, repeats=3) == 0  # cached: nothing timed twice
    assert all(value >= 0 for value in again.kernels.values())


def test_table_of_another_cpu_is_refused(tmp_path):
    path = tmp_path / "table.json"
    table = load_table(path, "onnxruntime", 1)
    table.kernels["add|int8|in=4x8x8|out=0|k=0|s=1|g=1|p=0|f=|b=1"] = 0.01
    table.cpu = "Imaginary RISC-V board, 4 logical cores"
    table.save()
    with pytest.raises(ConfigError) as error:
        load_table(path, "onnxruntime", 1)
    message = str(error.value)
    assert "Imaginary RISC-V board" in message and cpu_description() in message
    assert "hycomp profile" in message and "--any-cpu" in message
    foreign = load_table(path, "onnxruntime", 1, any_cpu=True)  # a deliberate cross-device prediction
    assert foreign.kernels == {"add|int8|in=4x8x8|out=0|k=0|s=1|g=1|p=0|f=|b=1": 0.01}
    with pytest.raises(ConfigError, match="cannot add kernels"):
        profile_kernels(foreign, [Kernel("add", "int8", (8, 8, 8))], repeats=3)
    with pytest.raises(ConfigError, match="2 thread"):
        load_table(path, "onnxruntime", 2, any_cpu=True)
    json.loads(path.read_text())  # still a plain JSON file


def test_default_calls_spread_rows_over_distinct_experts():
    from pipelines.deploy.latency_model import default_calls

    assert default_calls(1, 1, 2) == [(0, 2)]  # one expert sees both views in one call
    assert default_calls(4, 2, 1) == [(0, 1), (1, 1)]
    assert default_calls(3, 2, 2) == [(0, 2), (1, 1), (2, 1)]  # four routed rows, three experts
    assert sum(batch for _, batch in default_calls(4, 2, 2)) == 4


def test_chained_kernel_model_repeats_the_kernel(tmp_path):
    from pipelines.deploy.kernel_profile import chainable

    conv = Kernel("conv", "int8", (4, 8, 8), out_channels=4, kernel=3, pads=1)
    path = tmp_path / "chain.onnx"
    onnx.save(kernel_model(conv, repeat=3), str(path))
    assert [kernel.op for kernel in kernels_of(path)] == ["quantize", "conv", "conv", "conv", "dequantize"]
    strided = Kernel("conv", "int8", (4, 8, 8), out_channels=8, kernel=3, stride=2, pads=1)
    assert chainable(conv) and not chainable(strided)
    with pytest.raises(ConfigError, match="repeat"):
        kernel_model(strided, repeat=3)


def test_bundle_prediction_counts_gate_views_and_each_expert_call(tmp_path):
    from pipelines.deploy.latency_model import predict_bundle_latency

    path = residual_model(tmp_path / "m.onnx")
    table = LatencyTable(cpu_description(), "onnxruntime", "x", 1, overhead_ms={"session": 1.0})
    table.overhead_ms.update(
        routing=10.0, per_expert_call=100.0, views=1000.0, moe_single=10000.0, views_single=100000.0
    )
    for batch in (1, 2):
        table.kernels.update({kernel.key(): 0.0 for kernel in kernels_of(path, batch)})
    # gate (1 session) + two expert calls (2 sessions) + routing + one extra call + views
    assert predict_bundle_latency(path, [path, path], 1, table, 2, [(0, 1), (1, 1)]) == pytest.approx(1113.0)
    assert predict_bundle_latency(path, [path], 1, table, 1) == pytest.approx(10001.0)
    # one net skips the gate: its views pay their own (numpy-only) overhead, not the gated path's
    assert predict_bundle_latency(path, [path], 1, table, 2) == pytest.approx(110001.0)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_two_input_kernels_are_timed_on_the_engine(engine):
    # both engines are dependencies of hycomp (pyproject): a missing one fails here instead of skipping
    table = LatencyTable(cpu_description(), engine, "x", 1)
    add = Kernel("add", "int8", (4, 8, 8))
    conv = Kernel("conv", "int8", (4, 8, 8), out_channels=8, kernel=3, stride=2, pads=1)
    assert profile_kernels(table, [add, conv], repeats=5) == 2
    assert {add.key(), conv.key()} <= table.kernels.keys()
    assert {"session", "routing", "per_expert_call", "views", "views_single"} <= table.overhead_ms.keys()
