"""A per-device latency model (nn-Meter style): a deployed ONNX file is split into the kernels the engine
runs after fusion, and its latency predicted as per-call overhead plus the sum of each kernel's latency
from a lookup table measured once on the device. Torch-free: it runs with onnx, numpy and the engine.

Example::

    table = load_table(default_table_path(root, "onnxruntime", 1))  # refuses a table of another CPU
    profile_kernels(table, kernels_of(Path("expert_0.int8.onnx")))  # times the kernels it lacks
    milliseconds = predict_latency(Path("expert_0.int8.onnx"), table)
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipelines.errors import ConfigError, DataError, unknown_name
from pipelines.timing import cpu_description, measure_latency

__all__ = [
    "Kernel",
    "LatencyTable",
    "kernels_of",
    "predict_latency",
    "predict_bundle_latency",
    "bundle_kernels",
    "default_calls",
    "expert_calls",
    "predict_deployed",
    "profile_kernels",
    "load_table",
    "default_table_path",
    "engine_version",
    "TABLE_FORMAT",
]

TABLE_FORMAT = 1
_ENGINES = ("onnxruntime", "openvino")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FREE = ("Constant", "Identity")  # folded away by the engine
_ACTIVATIONS = ("Relu", "Clip")


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


# ------------------------------------------------------------------------------------------ kernels


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _shapes(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape (batch fixed to ``batch``) by ONNX shape inference."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(dim.HasField("dim_value") for dim in dims):
            shapes[value.name] = tuple(dim.dim_value for dim in dims)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def kernels_of(path: Path, batch: int = 1) -> list[Kernel]:
    """The kernels ONNX Runtime runs for the model at ``path``, after its fusions.

    QDQ int8: a DequantizeLinear -> op -> QuantizeLinear group is one int8 kernel (QLinearConv, QLinearAdd,
    QLinearGlobalAveragePool; the quantizer already dropped the ReLU / Clip into the output range); the
    input's QuantizeLinear and a DequantizeLinear feeding an fp32 op are kernels of their own. fp32: a Conv
    absorbs a following residual Add (when it is the Add's only producer not yet computed) and ReLU / Clip,
    as the NCHWc transformer does; an Add absorbs a following ReLU.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"model: {path} does not exist.")
    model = onnx.load(str(path))
    shapes = _shapes(model, batch)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.op_type not in _FREE]
    producer = {output: node for node in nodes for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def source(name: str) -> str:
        """Through a DequantizeLinear of an activation back to the tensor it reads."""
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in initializers:
            quantize = producer.get(node.input[0])
            return (
                quantize.input[0]
                if quantize is not None and quantize.op_type == "QuantizeLinear"
                else node.input[0]
            )
        return name

    def is_int8(node: onnx.NodeProto) -> bool:
        first = producer.get(node.input[0])
        return first is not None and first.op_type == "DequantizeLinear"

    def weight_precision(node: onnx.NodeProto) -> str:
        weight = producer.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.op_type != "DequantizeLinear":
            return "int8"
        tensor = initializers.get(weight.input[0])
        return "int8-u8w" if tensor is not None and tensor.data_type == TensorProto.UINT8 else "int8"

    def single_consumer(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in {o.name for o in model.graph.output} else None

    def in_shape(name: str) -> tuple[int, ...]:
        shape = shapes.get(name)
        if shape is None:
            raise DataError(
                f"model: {path} has no static shape for tensor {name!r}; re-export it with opset 17."
            )
        return tuple(shape[1:])

    kernels: list[Kernel] = []
    absorbed: set[int] = set()
    for node in nodes:
        if id(node) in absorbed:
            continue
        op = node.op_type
        if op == "QuantizeLinear":
            # Only the quantization of an fp32 tensor that no int8 op produced (the model input) runs.
            upstream = producer.get(node.input[0])
            if upstream is None or (upstream.op_type != "DequantizeLinear" and not is_int8(upstream)):
                kernels.append(Kernel("quantize", "int8", in_shape(node.input[0]), batch=batch))
            continue
        if op == "DequantizeLinear":
            if node.input[0] in initializers:
                continue  # a weight: folded into the int8 kernel
            users = consumers.get(node.output[0], [])
            if any(user.op_type not in _QDQ and not _int8_capable(user) for user in users) or node.output[
                0
            ] in {o.name for o in model.graph.output}:
                kernels.append(Kernel("dequantize", "int8", in_shape(node.input[0]), batch=batch))
            continue
        int8 = is_int8(node) and _int8_capable(node)
        precision = (
            weight_precision(node) if int8 and op in ("Conv", "Gemm") else ("int8" if int8 else "fp32")
        )
        fused: list[str] = []
        if op == "Conv":
            weight_shape = shapes[node.input[1]] if node.input[1] in shapes else shapes[source(node.input[1])]
            if not int8:
                follower = single_consumer(node.output[0])
                if follower is not None and follower.op_type == "Add":
                    fused.append("add")
                    absorbed.add(id(follower))
                    follower = single_consumer(follower.output[0])
                if follower is not None and follower.op_type in _ACTIVATIONS:
                    fused.append(follower.op_type.lower())
                    absorbed.add(id(follower))
            pads = _attribute(node, "pads", [0])
            kernels.append(
                Kernel(
                    "conv",
                    precision,
                    in_shape(source(node.input[0])),
                    out_channels=int(weight_shape[0]),
                    kernel=int(weight_shape[2]),
                    stride=int(_attribute(node, "strides", [1])[0]),
                    groups=int(_attribute(node, "group", 1)),
                    pads=int(pads[0]),
                    fused="+".join(fused),
                    batch=batch,
                )
            )
        elif op in ("Gemm", "MatMul"):
            weight_shape = shapes.get(node.input[1]) or shapes[source(node.input[1])]
            trans_b = _attribute(node, "transB", 0)
            out = weight_shape[0] if trans_b else weight_shape[-1]
            kernels.append(
                Kernel("gemm", precision, in_shape(source(node.input[0])), out_channels=int(out), batch=batch)
            )
        elif op in ("Add", "Mul", "Sum"):
            if not int8:
                follower = single_consumer(node.output[0])
                if follower is not None and follower.op_type in _ACTIVATIONS:
                    fused.append(follower.op_type.lower())
                    absorbed.add(id(follower))
            kernels.append(
                Kernel(op.lower(), precision, in_shape(node.output[0]), fused="+".join(fused), batch=batch)
            )
        elif op in ("GlobalAveragePool", "MaxPool", "AveragePool"):
            size = _attribute(node, "kernel_shape", [0])[0]
            kernels.append(
                Kernel(
                    "pool",
                    precision,
                    in_shape(source(node.input[0])),
                    kernel=int(size),
                    stride=int(_attribute(node, "strides", [1])[0]),
                    pads=int(_attribute(node, "pads", [0])[0]),
                    fused="global" if op == "GlobalAveragePool" else op.lower(),
                    batch=batch,
                )
            )
        elif op in ("Flatten", "Reshape"):
            kernels.append(Kernel("reshape", precision, in_shape(source(node.input[0])), batch=batch))
        else:
            kernels.append(Kernel(op, precision, in_shape(source(node.input[0])), batch=batch))
    convs = [kernel for kernel in kernels if kernel.op == "conv" and kernel.precision == "fp32"]
    if convs:  # fp32 convs run in the NCHWc layout: one reorder into it and one out of it per model
        kernels.append(Kernel("reorder", "fp32", convs[0].in_shape, batch=batch))
        kernels.append(Kernel("reorder", "fp32", convs[-1].out_shape(), batch=batch))
    return kernels


def _int8_capable(node: onnx.NodeProto) -> bool:
    """Ops ONNX Runtime runs on uint8 when wrapped in DequantizeLinear / QuantizeLinear."""
    return node.op_type in (
        "Conv",
        "Add",
        "GlobalAveragePool",
        "MaxPool",
        "AveragePool",
        "Flatten",
        "Reshape",
        "Mul",
    )


def predict_latency(path: Path, table: LatencyTable, batch: int = 1) -> float:
    """Predicted milliseconds of one engine call of the model at ``path``: session overhead plus the table's
    latency of each kernel (interpolated where the table lacks a key)."""
    kernels = kernels_of(path, batch)
    return table.overhead_ms.get("session", 0.0) + sum(table.latency(kernel) for kernel in kernels)


def default_calls(num_experts: int, top_k: int, views: int = 1) -> list[tuple[int, int]]:
    """The expert calls (expert id, batch) of one batch-1 MoE call when routing is unknown: the ``views *
    top_k`` routed rows spread over as many distinct experts as there are (the most calls routing can make)."""
    rows = views * top_k if num_experts > 1 else views
    calls = min(rows, num_experts)
    return [(index, rows // calls + (1 if index < rows % calls else 0)) for index in range(calls)]


def expert_calls(
    gate: Path, num_experts: int, top_k: int, image: np.ndarray, views: int = 1
) -> list[tuple[int, int]]:
    """The expert calls (expert id, batch) the bundle runtime makes for ``image`` (one float32 (C, H, W) or
    (1, C, H, W) image): the gate's top-k over each view, as :class:`~pipelines.deploy.runtime.BundleMoE`
    routes. Routing is a property of the model, not of the device: it is computed with ONNX Runtime here."""
    from pipelines import symmetry
    from pipelines.deploy.engines import open_model

    images = np.asarray(image, np.float32).reshape(1, *np.shape(image)[-3:])
    if num_experts == 1:
        return [(0, views)]
    stacked = np.ascontiguousarray(np.concatenate(symmetry.views(images, views))) if views > 1 else images
    logits = open_model(Path(gate), "onnxruntime", 1)(stacked)
    chosen = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    counts = np.bincount(chosen.ravel(), minlength=num_experts)
    return [(int(index), int(count)) for index, count in enumerate(counts) if count]


def predict_bundle_latency(
    gate: Path,
    experts: list[Path],
    top_k: int,
    table: LatencyTable,
    views: int = 1,
    calls: list[tuple[int, int]] | None = None,
) -> float:
    """Predicted milliseconds of one batch-1 call of a deployed MoE (:class:`~pipelines.deploy.runtime.BundleMoE`):
    the gate on the ``views`` stacked views (with more than one expert), each expert call of ``calls``
    ((expert id, batch); :func:`default_calls` when None) and the runtime's overheads around them."""
    calls = calls if calls is not None else default_calls(len(experts), top_k, views)
    expert_ms = sum(predict_latency(experts[index], table, batch) for index, batch in calls)
    if len(experts) == 1:
        overhead = table.overhead_ms.get("views_single", 0.0) if views > 1 else 0.0
        return overhead + table.overhead_ms.get("moe_single", 0.0) + expert_ms
    overhead = table.overhead_ms.get("views", 0.0) if views > 1 else 0.0
    routing = table.overhead_ms.get("routing", 0.0) + table.overhead_ms.get("per_expert_call", 0.0) * (
        len(calls) - 1
    )
    return overhead + routing + predict_latency(gate, table, views) + expert_ms


def bundle_kernels(gate: Path, experts: list[Path], views: int = 1) -> list[Kernel]:
    """Every kernel a bundle's call may run: the gate at batch ``views``, each expert at batches 1..views."""
    kernels = kernels_of(gate, views) if len(experts) > 1 else []
    for path in experts:
        for batch in range(1, views + 1):
            kernels += kernels_of(path, batch)
    return kernels


# ------------------------------------------------------------------------------------------ profiling


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
        session = table.overhead_ms.get("session", 0.0)
        boundaries: dict[tuple, float] = {}

        def half_round_trip(shape: tuple[int, ...], precision: str = "int8") -> float:
            if (shape, precision) not in boundaries:
                model = boundary_model(shape, precision)
                round_trip = _time_model(model, table.engine, table.threads, repeats, scratch)
                boundaries[shape, precision] = max(round_trip - session, 0.0) / 2
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
            elapsed = (
                _time_model(kernel_model(kernel), table.engine, table.threads, repeats, scratch) - session
            )
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


def predict_deployed(
    folder: Path, table: LatencyTable, precision: str | None = None, image: np.ndarray | None = None
) -> float:
    """Predicted batch-1 milliseconds of the bundle in ``folder`` (its manifest's precision by default), routed
    as ``image`` routes (:func:`expert_calls`) or, without one, over distinct experts (:func:`default_calls`).
    Kernels the table lacks are timed first when the table is this machine's, else interpolated."""
    from pipelines.deploy.manifest import file_names, read_manifest

    manifest = read_manifest(Path(folder))
    if manifest.layout != "separate":
        raise ConfigError(
            f"measure.latency: 'predicted' models the separate layout only, and {folder} is a "
            f"{manifest.layout}-layout bundle (a trunk before the gate). Use measure.latency: measured."
        )
    gate_name, expert_names = file_names(manifest.num_experts, precision or manifest.precision)
    gate, experts = Path(folder) / gate_name, [Path(folder) / name for name in expert_names]
    if table.cpu == cpu_description():
        profile_kernels(table, bundle_kernels(gate, experts, manifest.views))
    calls = (
        None
        if image is None
        else expert_calls(gate, manifest.num_experts, manifest.top_k, image, manifest.views)
    )
    return predict_bundle_latency(gate, experts, manifest.top_k, table, manifest.views, calls)
