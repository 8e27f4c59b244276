"""Measuring the latency table on this machine: each kernel as a one-kernel ONNX model timed on the engine,
less the call's and the int8 boundaries' cost, and the overheads the bundle runtime adds around its calls."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipelines.deploy.latency_table import Kernel, LatencyTable
from pipelines.errors import ConfigError, unknown_name
from pipelines.timing import cpu_description, measure_latency

__all__ = ["chainable", "kernel_model", "boundary_model", "profile_kernels", "OVERHEAD_ROUNDS"]


def _float_input(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _quantized(nodes: list, inits: list, name: str, int8: bool) -> str:
    """Wrap ``name`` in QuantizeLinear -> DequantizeLinear (activation uint8) when ``int8``."""
    if not int8:
        return name
    if f"{name}_scale" not in {tensor.name for tensor in inits}:
        inits.append(numpy_helper.from_array(np.array(0.02, dtype=np.float32), f"{name}_scale"))
        inits.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), f"{name}_zero"))
    nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_q"]))
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [f"{name}_dq"])
    )
    return f"{name}_dq"


def _weight(nodes: list, inits: list, name: str, shape: tuple[int, ...], precision: str, rng) -> str:
    values = rng.standard_normal(shape).astype(np.float32) * 0.1
    if precision == "fp32":
        inits.append(numpy_helper.from_array(values, name))
        return name
    channels = shape[0]
    if precision == "int8-u8w":
        quantized, zero = rng.integers(0, 255, shape).astype(np.uint8), np.full(channels, 128, np.uint8)
    else:
        quantized, zero = rng.integers(-64, 64, shape).astype(np.int8), np.zeros(channels, np.int8)
    inits.append(numpy_helper.from_array(quantized, f"{name}_q"))
    inits.append(numpy_helper.from_array(np.full(channels, 0.01, np.float32), f"{name}_scale"))
    inits.append(numpy_helper.from_array(zero, f"{name}_zero"))
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name], axis=0)
    )
    return name


def _bias(nodes: list, inits: list, name: str, channels: int, precision: str) -> str:
    if precision == "fp32":
        inits.append(numpy_helper.from_array(np.zeros(channels, np.float32), name))
        return name
    inits.append(numpy_helper.from_array(np.zeros(channels, np.int32), f"{name}_q"))
    inits.append(numpy_helper.from_array(np.full(channels, 0.0002, np.float32), f"{name}_scale"))
    inits.append(numpy_helper.from_array(np.zeros(channels, np.int32), f"{name}_zero"))
    nodes.append(
        helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name], axis=0)
    )
    return name


def chainable(kernel: Kernel) -> bool:
    """Whether ``kernel`` can read its own output (a conv or an element-wise op that keeps the shape)."""
    return kernel.op in ("conv", "add", "mul", "sum") and kernel.out_shape() == kernel.in_shape


def kernel_model(kernel: Kernel, seed: int = 0, repeat: int = 1) -> onnx.ModelProto:
    """A one-kernel ONNX model of ``kernel`` in the form the deploy step writes (QDQ for int8); with
    ``repeat`` > 1 (a :func:`chainable` kernel only) that many copies of it, each reading the last one's output.

    Its fp32 inputs and output are quantized / dequantized at the boundary when int8; the profiler
    subtracts what those boundaries cost (:func:`boundary_model`), or times a chain of three minus one."""
    if repeat > 1 and not chainable(kernel):
        raise ConfigError(f"repeat: {kernel.key()} does not keep its shape; it cannot be chained.")
    rng = np.random.default_rng(seed)
    int8 = kernel.precision != "fp32"
    batch = kernel.batch
    nodes: list = []
    inits: list = []
    inputs = [_float_input("x", (batch, *kernel.in_shape))]
    x = _quantized(nodes, inits, "x", int8 and kernel.op not in ("quantize", "dequantize", "gemm"))
    if kernel.op == "gemm" and int8:
        x = _quantized(nodes, inits, "x", True)
    out_int8 = int8 and kernel.op not in ("dequantize", "quantize")
    if kernel.op == "conv":
        channels, _, _ = kernel.in_shape
        weight = _weight(
            nodes,
            inits,
            "w",
            (kernel.out_channels, channels // kernel.groups, kernel.kernel, kernel.kernel),
            kernel.precision,
            rng,
        )
        bias = _bias(nodes, inits, "b", kernel.out_channels, kernel.precision)
        if "add" in kernel.fused:
            inputs.append(_float_input("residual", (batch, *kernel.out_shape())))
        last = x
        for step in range(repeat):
            if step:  # the next copy reads this one's output, quantized as the deploy step writes it
                x = _quantized(nodes, inits, last, int8)
            nodes.append(
                helper.make_node(
                    "Conv",
                    [x, weight, bias],
                    [f"conv{step}"],
                    kernel_shape=[kernel.kernel] * 2,
                    strides=[kernel.stride] * 2,
                    pads=[kernel.pads] * 4,
                    group=kernel.groups,
                )
            )
            last = f"conv{step}"
            for part in filter(None, kernel.fused.split("+")):
                if part == "add":
                    nodes.append(helper.make_node("Add", [last, "residual"], [f"sum{step}"]))
                    last = f"sum{step}"
                elif part == "relu":
                    nodes.append(helper.make_node("Relu", [last], [f"act{step}"]))
                    last = f"act{step}"
                elif part == "clip":
                    if not step:
                        inits += [
                            numpy_helper.from_array(np.array(v, np.float32), n)
                            for n, v in (("lo", 0.0), ("hi", 6.0))
                        ]
                    nodes.append(helper.make_node("Clip", [last, "lo", "hi"], [f"act{step}"]))
                    last = f"act{step}"
    elif kernel.op == "gemm":
        weight = _weight(nodes, inits, "w", (kernel.out_channels, kernel.in_shape[0]), kernel.precision, rng)
        bias = _bias(nodes, inits, "b", kernel.out_channels, kernel.precision)
        nodes.append(helper.make_node("Gemm", [x, weight, bias], ["gemm"], transB=1))
        last = "gemm"
    elif kernel.op in ("add", "mul", "sum"):
        inputs.append(_float_input("y", (batch, *kernel.in_shape)))
        y = _quantized(nodes, inits, "y", int8)
        last = x
        for step in range(repeat):
            if step:
                x = _quantized(nodes, inits, last, int8)
            nodes.append(helper.make_node(kernel.op.capitalize(), [x, y], [f"add{step}"]))
            last = f"add{step}"
            if "relu" in kernel.fused:
                nodes.append(helper.make_node("Relu", [last], [f"act{step}"]))
                last = f"act{step}"
    elif kernel.op == "pool":
        if kernel.fused == "global":
            nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
        else:
            op = "MaxPool" if kernel.fused == "maxpool" else "AveragePool"
            nodes.append(
                helper.make_node(
                    op,
                    [x],
                    ["pool"],
                    kernel_shape=[kernel.kernel] * 2,
                    strides=[kernel.stride] * 2,
                    pads=[kernel.pads] * 4,
                )
            )
        last = "pool"
    elif kernel.op == "reshape":
        nodes.append(helper.make_node("Flatten", [x], ["flat"]))
        last = "flat"
    elif kernel.op == "quantize":
        inits.append(numpy_helper.from_array(np.array(0.02, dtype=np.float32), "s"))
        inits.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), "z"))
        nodes.append(helper.make_node("QuantizeLinear", [x, "s", "z"], ["q"]))
        last = "q"
    elif kernel.op == "dequantize":
        inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, [batch, *kernel.in_shape])]
        inits.append(numpy_helper.from_array(np.array(0.02, dtype=np.float32), "s"))
        inits.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), "z"))
        nodes.append(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["dq"]))
        last = "dq"
    else:
        nodes.append(helper.make_node(kernel.op, [x], ["other"]))
        last = "other"
    if out_int8:
        last = _quantized(nodes, inits, last, True)
    if kernel.op == "quantize":
        output = helper.make_tensor_value_info(last, TensorProto.UINT8, None)
    else:
        output = helper.make_tensor_value_info(last, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "kernel", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def boundary_model(shape: tuple[int, ...], precision: str = "int8") -> onnx.ModelProto:
    """What a one-kernel model pays at its fp32 ends and the real graph does not, twice (once each way).

    int8: fp32 -> QuantizeLinear -> DequantizeLinear. fp32 (C, H, W): a 1x1 depthwise conv, whose NCHWc
    layout reorders are those a lone conv pays on entry and exit (inside a model, once per model)."""
    nodes: list = []
    inits: list = []
    if precision == "fp32":
        channels = shape[1]
        inits.append(numpy_helper.from_array(np.ones((channels, 1, 1, 1), np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], group=channels))
        last = "y"
    else:
        last = _quantized(nodes, inits, "x", True)
    graph = helper.make_graph(
        nodes, "boundary", [_float_input("x", shape)], [_float_input(last, shape)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _empty_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "empty",
        [_float_input("x", (1, 1))],
        [_float_input("y", (1, 1))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _open(path: Path, engine: str, threads: int) -> Callable:
    """A callable session of a non-ONNX-Runtime engine on ``path`` (:mod:`pipelines.deploy.engines`)."""
    try:
        from pipelines.deploy.engines import open_model
    except ImportError:
        raise unknown_name("engine", engine, ("onnxruntime",)) from None
    return open_model(path, engine=engine, threads=threads)


def _time_model(model: onnx.ModelProto, engine: str, threads: int, repeats: int, scratch: Path) -> float:
    """Quiet milliseconds (minimum over ``repeats``) of one call of ``model`` on random inputs."""
    path = scratch / "model.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        shape = [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.UINT8:
            feeds[value.name] = rng.integers(0, 255, shape).astype(np.uint8)
        else:
            feeds[value.name] = rng.random(shape, dtype=np.float32)
    if engine != "onnxruntime":
        session = _open(path, engine, threads)
        arrays = list(feeds.values())  # in the model's input order
        request = session.request
        run = lambda: request.infer(arrays, share_inputs=True)  # noqa: E731
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, feeds)  # noqa: E731
    stats = measure_latency(
        run, backend=engine, threads=threads, batch=1, warmup=max(3, repeats // 5), repeats=repeats
    )
    return stats.min_ms


OVERHEAD_ROUNDS = 5  # each overhead is a difference of two minima: the median of 5 steadies it


def _time_moe_overheads(engine: str, threads: int, repeats: int, scratch: Path) -> dict[str, float]:
    """What :class:`~pipelines.deploy.runtime.OrtMoE` adds around its engine calls: the median over
    :data:`OVERHEAD_ROUNDS` rounds of :func:`_moe_overheads_once` (one round's differences of minima moved by
    up to 2x between profiles of the same machine)."""
    rounds = [_moe_overheads_once(engine, threads, repeats, scratch) for _ in range(OVERHEAD_ROUNDS)]
    return {key: float(np.median([values[key] for values in rounds])) for key in rounds[0]}


def _moe_overheads_once(engine: str, threads: int, repeats: int, scratch: Path) -> dict[str, float]:
    """What :class:`~pipelines.deploy.runtime.OrtMoE` adds around its engine calls, on almost empty models."""
    from pipelines.deploy.engines import EngineModel, open_model
    from pipelines.deploy.runtime import OrtMoE

    def tiny(outputs: int) -> EngineModel:
        # Small, but image-sized and with a wide activation: the routing's numpy work runs with caches as
        # cold as after a real gate or expert (after a 1x1 model it runs measurably faster).
        rng = np.random.default_rng(0)
        weights = [
            numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
            for name, shape in (("w1", (64, 3, 3, 3)), ("w2", (outputs, 64, 1, 1)))
        ]
        graph = helper.make_graph(
            [
                helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("Conv", ["c1", "w2"], ["c2"], kernel_shape=[1, 1]),
                helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
                helper.make_node("Flatten", ["p"], ["y"]),
            ],
            "tiny",
            [_float_input("x", ("batch", 3, 32, 32))],  # views > 1 stack their views in the batch
            [_float_input("y", ("batch", outputs))],
            weights,
        )
        path = scratch / f"tiny{outputs}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return open_model(path, engine, threads)

    def quiet(call: Callable) -> float:
        return measure_latency(call, backend=engine, threads=threads, batch=1, repeats=repeats).min_ms

    one = two = np.zeros((1, 3, 32, 32), np.float32)
    # Each overhead is the MoE call minus the engine calls it makes, those timed alone on the same inputs.
    session_one = tiny(1)
    session = quiet(lambda: session_one(one))
    single = OrtMoE(tiny(1), [session_one], 1)
    single_ms = quiet(lambda: single(one))
    gate, experts = tiny(2), [tiny(2), tiny(2)]
    call = quiet(lambda: gate(two))
    call_two = quiet(lambda: gate(np.concatenate([two, two])))
    routed = OrtMoE(gate, experts, 1)  # gate + one expert call
    routing = max(quiet(lambda: routed(two)) - 2 * call, 0.0)
    both = OrtMoE(gate, experts, 2)  # gate + two expert calls
    per_call = max(quiet(lambda: both(two)) - 3 * call - routing, 0.0)
    viewed = OrtMoE(
        gate, experts, 1, views=2
    )  # both views of a blank image to one expert: two calls at batch 2
    views = max(quiet(lambda: viewed(two)) - 2 * call_two - routing, 0.0)
    # A single net skips the gate: its views cost only the stacking and the mean (a different code path).
    viewed_single = OrtMoE(tiny(1), [session_one], 1, views=2)
    session_two = quiet(lambda: session_one(np.concatenate([one, one])))
    views_single = max(quiet(lambda: viewed_single(one)) - session_two - max(single_ms - session, 0.0), 0.0)
    return {
        "moe_single": max(single_ms - session, 0.0),
        "routing": routing,
        "per_expert_call": per_call,
        "views": views,
        "views_single": views_single,
    }


def profile_kernels(
    table: LatencyTable, kernels: Iterable[Kernel], *, repeats: int = 200, overheads: bool = True
) -> int:
    """Time every kernel of ``kernels`` that ``table`` lacks (and the per-call overheads when missing) on this
    machine, add them to the table and save it when it has a path. Returns how many kernels were timed.

    A kernel's time is its one-kernel model's quiet time minus the session overhead and, for int8, minus
    half a quantize-dequantize round trip at each fp32 boundary the real graph does not have."""
    if table.cpu != cpu_description():
        raise ConfigError(
            f"profile: the table was measured on {table.cpu!r}; this machine ({cpu_description()!r}) cannot "
            "add kernels to it. Profile on that machine, or start a table for this one."
        )
    missing = sorted({kernel for kernel in kernels if kernel.key() not in table.kernels}, key=Kernel.key)
    with tempfile.TemporaryDirectory(prefix="hycomp-profile-") as folder:
        scratch = Path(folder)
        if overheads and not {"session", "routing", "views", "views_single"} <= table.overhead_ms.keys():
            table.overhead_ms["session"] = _time_model(
                _empty_model(), table.engine, table.threads, repeats, scratch
            )
            table.overhead_ms.update(_time_moe_overheads(table.engine, table.threads, repeats, scratch))
        boundaries: dict[tuple, float] = {}

        def above_session(model: onnx.ModelProto) -> float:
            """``model``'s time less an empty graph's timed right after it: the session's cost is most of a
            small kernel's, and this VM's speed drifts (by 2 us a call within minutes), so it is taken anew."""
            elapsed = _time_model(model, table.engine, table.threads, repeats, scratch)
            return elapsed - _time_model(_empty_model(), table.engine, table.threads, repeats, scratch)

        def half_round_trip(shape: tuple[int, ...], precision: str = "int8") -> float:
            if (shape, precision) not in boundaries:
                boundaries[shape, precision] = max(above_session(boundary_model(shape, precision)), 0.0) / 2
            return boundaries[shape, precision]

        def time(kernel: Kernel, repeat: int = 1) -> float:
            return _time_model(
                kernel_model(kernel, repeat=repeat), table.engine, table.threads, repeats, scratch
            )

        for kernel in missing:
            if chainable(kernel) and (kernel.precision != "fp32" or table.engine != "onnxruntime"):
                # Inside a graph, with no boundary to subtract: a chain of three minus a chain of one, halved.
                table.kernels[kernel.key()] = max((time(kernel, 3) - time(kernel)) / 2, 0.0)
                continue
            if kernel.op == "reorder":
                table.kernels[kernel.key()] = half_round_trip((kernel.batch, *kernel.in_shape), "fp32")
                continue
            elapsed = above_session(kernel_model(kernel))
            if kernel.precision != "fp32" and kernel.op not in ("quantize", "dequantize"):
                boundary_in = half_round_trip((kernel.batch, *kernel.in_shape)) * (
                    2 if kernel.op in ("add", "mul", "sum") else 1
                )
                elapsed -= boundary_in + half_round_trip((kernel.batch, *kernel.out_shape()))
            elif kernel.op == "conv" and table.engine == "onnxruntime":
                elapsed -= half_round_trip((kernel.batch, *kernel.in_shape), "fp32") + half_round_trip(
                    (kernel.batch, *kernel.out_shape()), "fp32"
                )
            table.kernels[kernel.key()] = max(elapsed, 0.0)
    if table.path is not None:
        table.save()
    return len(missing)
