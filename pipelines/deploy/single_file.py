"""Merges a bundle's gate and expert ONNX graphs (fp32 or already-quantized int8) into ONE ONNX file that
plain ONNX Runtime or OpenVINO runs with no hycomp code: test-time views, gate, top-k routing and the
weighted combination of the chosen experts are ONNX ops, each expert an ``If`` branch that runs only when
rows are routed to it. Quantize first, merge after: ONNX Runtime's static quantizer does not enter
subgraphs. Torch-free."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipelines import symmetry
from pipelines.errors import ConfigError, DataError

__all__ = ["merge_moe_onnx"]

_INT64_MIN = np.iinfo(np.int64).min
_MIN_OPSET = 16  # ScatterND's reduction="add"


class _Builder:
    """Accumulates the nodes and constants of the merged graph, each under a unique name. A branch builder
    (an ``If`` body) has its own nodes but shares the names and the small constants of the main graph."""

    def __init__(self, parent: _Builder | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = parent.initializers if parent else []
        self.counter = parent.counter if parent else itertools.count(1)

    def name(self, stem: str) -> str:
        return f"moe/{stem}_{next(self.counter)}"

    def branch(self) -> _Builder:
        return _Builder(self)

    def graph(
        self, stem: str, outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] = ()
    ) -> onnx.GraphProto:
        """The nodes as an ``If`` body (no inputs: it reads the enclosing graph's tensors)."""
        return helper.make_graph(self.nodes, self.name(stem), [], outputs, initializer=list(initializers))

    def if_node(
        self, condition: str, then_branch: onnx.GraphProto, else_branch: onnx.GraphProto, stem: str
    ) -> str:
        output = self.name(stem)
        self.nodes.append(
            helper.make_node(
                "If",
                [condition],
                [output],
                name=f"{output}/If",
                then_branch=then_branch,
                else_branch=else_branch,
            )
        )
        return output

    def constant(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        stem: str | None = None,
        output: str | None = None,
        **attributes,
    ) -> str:
        output = output or self.name(stem or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, inputs, [output], name=f"{output}/{op_type}", **attributes)
        )
        return output


def _load(path: Path, role: str) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role}: {path} does not exist; export the bundle with deploy_moe first.")
    model = onnx.load(str(path))
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise DataError(
            f"{role}: {path} has {len(model.graph.input)} inputs and {len(model.graph.output)} outputs; "
            "a gate or expert file has one of each (written by export_onnx)."
        )
    return model


def _width(model: onnx.ModelProto, path: Path, role: str) -> int:
    """The static size of the output's last dimension (classes of an expert, experts of a gate)."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise DataError(
            f"{role}: {path} output is not (batch, n) with a fixed n; re-export it with export_onnx."
        )
    return int(dims[1].dim_value)


def _prefixed(model: onnx.ModelProto, prefix: str) -> onnx.GraphProto:
    """The model's graph with every node, tensor and initializer name prefixed (unique in the merged file)."""
    return onnx.compose.add_prefix_graph(model.graph, prefix)


def _views(builder: _Builder, images: str, count: int) -> str:
    """The ``count`` symmetric views of ``images`` (pipelines.symmetry's order) stacked along the batch."""
    if count == 1:
        return images
    stacked = []
    for index in range(count):
        _, flip_width, flip_height, transpose = symmetry.SYMMETRIES[index]
        view = images
        for flip, axis in ((flip_width, 3), (flip_height, 2)):
            if flip:  # a Slice with step -1 walks the axis backwards
                view = builder.op(
                    "Slice",
                    [
                        view,
                        builder.constant("start", np.array([-1], np.int64)),
                        builder.constant("end", np.array([_INT64_MIN], np.int64)),
                        builder.constant("axis", np.array([axis], np.int64)),
                        builder.constant("step", np.array([-1], np.int64)),
                    ],
                    "flip",
                )
        if transpose:
            view = builder.op("Transpose", [view], "transpose", perm=[0, 1, 3, 2])
        stacked.append(view)
    return builder.op("Concat", stacked, "views", axis=0)


def _view_mean(builder: _Builder, logits: str, images: str, count: int, classes: int, output: str) -> str:
    """(count * B, classes) logits -> (B, classes), each sample's views averaged."""
    if count == 1:
        return builder.op("Identity", [logits], output=output)
    batch = builder.op("Shape", [images], "batch", start=0, end=1)
    shape = builder.op(
        "Concat",
        [
            builder.constant("views", np.array([count], np.int64)),
            batch,
            builder.constant("classes", np.array([classes], np.int64)),
        ],
        "shape",
        axis=0,
    )
    per_view = builder.op("Reshape", [logits, shape], "per_view")
    total = builder.op(
        "ReduceSum", [per_view, builder.constant("axis", np.array([0], np.int64))], "sum", keepdims=0
    )
    return builder.op("Div", [total, builder.constant("count", np.array(count, np.float32))], output=output)


def _logits_info(name: str, classes: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, classes])


def _empty_logits(builder: _Builder, classes: int) -> str:
    """(0, classes) float32: what a skipped expert gives."""
    # ConstantOfShape rather than an empty Constant: OpenVINO reads a zero-size Constant as a scalar.
    return builder.op(
        "ConstantOfShape",
        [builder.constant("empty_shape", np.array([0, classes], np.int64))],
        "empty",
        value=numpy_helper.from_array(np.zeros(1, np.float32)),
    )


def _expert_on_rows(
    builder: _Builder, expert: onnx.GraphProto, index: int, images: str, rows: str, classes: int
) -> str:
    """Expert ``index``'s logits on ``images[rows]``; an ``If`` skips it when no row is routed to it."""
    routed = builder.op(
        "Greater",
        [builder.op("Size", [rows], "count"), builder.constant("none", np.array(0, np.int64))],
        "routed",
    )
    run, skip = builder.branch(), builder.branch()
    # The body reads the expert's (prefixed) input name from the enclosing graph; its weights stay in the body
    # (each expert is in the file once): ONNX Runtime pre-packs a body's own int8 weights, not outer ones.
    run.op("Gather", [images, rows], output=expert.input[0].name, axis=0)
    run.nodes.extend(expert.node)
    empty = _empty_logits(skip, classes)
    return builder.if_node(
        routed,
        run.graph(f"expert_{index}", [_logits_info(expert.output[0].name, classes)], expert.initializer),
        skip.graph(f"expert_{index}_skipped", [_logits_info(empty, classes)]),
        f"expert_{index}_logits",
    )


def _rows_of(builder: _Builder, hits: str) -> tuple[str, str]:
    """(positions, rows) where the (rows, k) boolean ``hits`` holds: NonZero's (2, M) row and top-k slot
    pairs, and their row indices (ascending)."""
    positions = builder.op("NonZero", [hits], "positions")  # (2, M): row, top-k slot; rows ascending
    rows = builder.op("Gather", [positions, builder.constant("zero", np.array(0, np.int64))], "rows", axis=0)
    return positions, rows


def _top1(
    builder: _Builder, experts: list[onnx.GraphProto], images: str, probabilities: str, classes: int
) -> str:
    """Top-1 routing: each row gets its best expert's logits (the combine weight p / p is 1: no weighting).
    Each expert runs on its rows, skipped by an ``If`` when it has none, and one ScatterND puts every row
    back (the rows of all experts are a permutation of the batch, so no zeros to add into)."""
    # ArgMax picks the first of equal maxima: TopK's and the stable argsort's order.
    chosen = builder.op("ArgMax", [probabilities], "chosen", axis=1, keepdims=1)
    rows, logits = [], []
    for index, expert in enumerate(experts):
        hits = builder.op("Equal", [chosen, builder.constant("expert", np.array(index, np.int64))], "hits")
        rows.append(_rows_of(builder, hits)[1])
        logits.append(_expert_on_rows(builder, expert, index, images, rows[-1], classes))
    gathered = builder.op("Concat", logits, "by_expert", axis=0)
    indices = builder.op(
        "Unsqueeze",
        [builder.op("Concat", rows, "rows", axis=0), builder.constant("column", np.array([1], np.int64))],
        "indices",
    )
    return builder.op("ScatterND", [gathered, indices, gathered], "combined")


def _top_k(
    builder: _Builder,
    experts: list[onnx.GraphProto],
    images: str,
    probabilities: str,
    top_k: int,
    classes: int,
) -> str:
    """Top-k routing (k > 1): each expert on the rows that chose it, weighted by its renormalized
    probability and added into its rows (ScatterND add; top-k picks distinct experts, so it is exact)."""
    # TopK returns the largest first and, among equal values, the lowest index first (torch.topk's order).
    top_values = builder.name("top_values")
    chosen = builder.name("chosen")
    builder.nodes.append(
        helper.make_node(
            "TopK",
            [probabilities, builder.constant("k", np.array([top_k], np.int64))],
            [top_values, chosen],
            name="moe/TopK",
            axis=1,
            largest=1,
            sorted=1,
        )
    )
    total = builder.op(
        "ReduceSum", [top_values, builder.constant("axis", np.array([1], np.int64))], "total", keepdims=1
    )
    weights = builder.op("Div", [top_values, total], "weights")
    shape = builder.op(
        "Concat",
        [
            builder.op("Shape", [images], "rows", start=0, end=1),
            builder.constant("classes", np.array([classes], np.int64)),
        ],
        "shape",
        axis=0,
    )
    combined = builder.op(
        "ConstantOfShape", [shape], "zeros", value=numpy_helper.from_array(np.zeros(1, np.float32))
    )
    column = builder.constant("column", np.array([1], np.int64))
    for index, expert in enumerate(experts):
        hits = builder.op("Equal", [chosen, builder.constant("expert", np.array(index, np.int64))], "hits")
        positions, rows = _rows_of(builder, hits)
        slot_pairs = builder.op("Transpose", [positions], "pairs", perm=[1, 0])
        row_weights = builder.op("GatherND", [weights, slot_pairs], "row_weights")
        logits = _expert_on_rows(builder, expert, index, images, rows, classes)
        weighted = builder.op(
            "Mul", [logits, builder.op("Unsqueeze", [row_weights, column], "weight")], "weighted"
        )
        indices = builder.op("Unsqueeze", [rows, column], "indices")
        combined = builder.op("ScatterND", [combined, indices, weighted], "combined", reduction="add")
    return combined


def _opsets(models: list[onnx.ModelProto]) -> list[onnx.OperatorSetIdProto]:
    """The union of the files' opset imports; their default-domain (ai.onnx) opsets must agree."""
    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    defaults = {
        opset.version for model in models for opset in model.opset_import if opset.domain in ("", "ai.onnx")
    }
    if len(defaults) > 1:
        raise DataError(
            f"the gate and expert files use different ONNX opsets {sorted(defaults)}; export them all with export_onnx."
        )
    versions[""] = max(versions.get("", 0), _MIN_OPSET)
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def merge_moe_onnx(
    gate_path: Path | None,
    expert_paths: list[Path],
    top_k: int,
    views: int,
    out_path: Path,
    trunk_path: Path | None = None,
) -> Path:
    """Write ``out_path``: one ONNX model equal to the bundle's gate + experts with numpy routing
    (``OrtMoE``): input ``input`` float32 (B, C, H, W), already normalized; output ``output`` (B, classes).

    One expert runs alone (no gate; ``gate_path`` may be None). With ``trunk_path`` (the shared layout) the
    trunk runs once on the (view-expanded) batch and the gate and the experts read its feature map. Example:
    ``merge_moe_onnx(Path("gate.int8.onnx"), [Path("expert_0.int8.onnx"), ...], 1, 2, Path("model.onnx"))``.
    """
    if not expert_paths:
        raise ConfigError("expert_paths: the list is empty; a Mixture-of-Experts has at least one expert.")
    if not isinstance(top_k, int) or not 1 <= top_k <= len(expert_paths):
        raise ConfigError(
            f"top_k: {top_k!r} must be between 1 and the number of experts ({len(expert_paths)})."
        )
    symmetry.check_views(views, "views")
    experts = [_load(path, f"expert_paths[{index}]") for index, path in enumerate(expert_paths)]
    widths = {_width(model, path, "expert") for model, path in zip(experts, expert_paths, strict=True)}
    if len(widths) != 1:
        raise DataError(f"expert_paths: the experts give different numbers of classes {sorted(widths)}.")
    classes = widths.pop()
    models = list(experts)
    builder = _Builder()
    value_info: list[onnx.ValueInfoProto] = []
    if trunk_path is None:
        source_input = experts[0].graph.input[0]
        images = _views(builder, source_input.name, views)
    else:
        trunk_model = _load(trunk_path, "trunk_path")
        models.append(trunk_model)
        trunk = _prefixed(trunk_model, "trunk/")
        source_input = helper.make_value_info("input", trunk_model.graph.input[0].type)
        builder.op("Identity", [_views(builder, source_input.name, views)], output=trunk.input[0].name)
        builder.nodes.extend(trunk.node)
        builder.initializers.extend(trunk.initializer)
        value_info.extend(trunk.value_info)
        images = trunk.output[0].name  # what the gate and the experts read
    if len(experts) == 1:  # the gate has one choice: skipped, as MixtureOfExperts.forward does
        expert = _prefixed(experts[0], "expert_0/")
        builder.op("Identity", [images], output=expert.input[0].name)
        builder.nodes.extend(expert.node)
        builder.initializers.extend(expert.initializer)
        value_info.extend(expert.value_info)
        combined = expert.output[0].name
    else:
        if gate_path is None:
            raise ConfigError(f"gate_path: None, but {len(experts)} experts need their gate's file.")
        gate_model = _load(gate_path, "gate_path")
        if _width(gate_model, Path(gate_path), "gate_path") != len(experts):
            raise DataError(
                f"gate_path: {gate_path} scores a different number of experts than the {len(experts)} given."
            )
        models.append(gate_model)
        gate = _prefixed(gate_model, "gate/")
        builder.op("Identity", [images], output=gate.input[0].name)
        builder.nodes.extend(gate.node)
        builder.initializers.extend(gate.initializer)
        value_info.extend(gate.value_info)
        probabilities = builder.op("Softmax", [gate.output[0].name], "probabilities", axis=1)
        graphs = [_prefixed(model, f"expert_{index}/") for index, model in enumerate(experts)]
        if top_k == 1:
            combined = _top1(builder, graphs, images, probabilities, classes)
        else:
            combined = _top_k(builder, graphs, images, probabilities, top_k, classes)
    output = _view_mean(builder, combined, source_input.name, views, classes, "output")

    batch = source_input.type.tensor_type.shape.dim[0]
    graph = helper.make_graph(
        builder.nodes,
        "hycomp_moe",
        [source_input],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch.dim_param or "batch", classes])],
        initializer=builder.initializers,
        value_info=value_info,
    )
    trunk_note = "" if trunk_path is None else ", on a shared trunk"
    merged = helper.make_model(
        graph,
        opset_imports=_opsets(models),
        producer_name="hycomp",
        doc_string=(
            f"Mixture-of-Experts: {len(experts)} expert(s), top-{top_k}, {views} test-time view(s){trunk_note}."
        ),
    )
    merged.ir_version = max(model.ir_version for model in models)
    onnx.checker.check_model(merged, full_check=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, str(out_path))
    return out_path
