"""A per-device latency model (nn-Meter style): a deployed ONNX file is split into the kernels the engine
runs after fusion, and its latency predicted as per-call overhead plus the sum of each kernel's latency
from a lookup table measured once on the device. Torch-free: it runs with onnx, numpy and the engine.

Example::

    table = load_table(default_table_path(root, "onnxruntime", 1))  # refuses a table of another CPU
    profile_kernels(table, kernels_of(Path("expert_0.int8.onnx")))  # times the kernels it lacks
    milliseconds = predict_latency(Path("expert_0.int8.onnx"), table)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from pipelines.deploy.kernel_profile import profile_kernels
from pipelines.deploy.latency_table import Kernel, LatencyTable
from pipelines.errors import ConfigError, DataError
from pipelines.timing import cpu_description

__all__ = [
    "kernels_of",
    "predict_latency",
    "predict_bundle_latency",
    "bundle_kernels",
    "default_calls",
    "expert_calls",
    "predict_deployed",
    "deployed_kernels",
]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FREE = ("Constant", "Identity")  # folded away by the engine
_ACTIVATIONS = ("Relu", "Clip")


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


def _bundle_files(folder: Path, precision: str | None = None):
    """(manifest, gate file, expert files) of the separate-layout bundle in ``folder``."""
    from pipelines.deploy.manifest import file_names, read_manifest

    manifest = read_manifest(folder)
    if manifest.layout != "separate":
        raise ConfigError(
            f"measure.latency: 'predicted' models the separate layout only, and {folder} is a "
            f"{manifest.layout}-layout bundle (a trunk before the gate). Use measure.latency: measured."
        )
    gate_name, expert_names = file_names(manifest.num_experts, precision or manifest.precision)
    return manifest, folder / gate_name, [folder / name for name in expert_names]


def deployed_kernels(folder: Path) -> list[Kernel]:
    """Every kernel the bundle in ``folder`` runs as :func:`predict_deployed` models it: its gate and experts
    at each batch its views give (not its one-file ``model.onnx``, whose routing the table does not hold)."""
    manifest, gate, experts = _bundle_files(Path(folder))
    return bundle_kernels(gate, experts, manifest.views)


def predict_deployed(
    folder: Path, table: LatencyTable, precision: str | None = None, image: np.ndarray | None = None
) -> float:
    """Predicted batch-1 milliseconds of the bundle in ``folder`` (its manifest's precision by default), routed
    as ``image`` routes (:func:`expert_calls`) or, without one, over distinct experts (:func:`default_calls`).
    Kernels the table lacks are timed first when the table is this machine's, else interpolated."""
    manifest, gate, experts = _bundle_files(Path(folder), precision)
    if table.cpu == cpu_description():
        profile_kernels(table, bundle_kernels(gate, experts, manifest.views))
    calls = (
        None
        if image is None
        else expert_calls(gate, manifest.num_experts, manifest.top_k, image, manifest.views)
    )
    return predict_bundle_latency(gate, experts, manifest.top_k, table, manifest.views, calls)
