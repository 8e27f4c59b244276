"""Deployment on a real int8 engine: ONNX export, ONNX Runtime static int8 quantization, and a
Mixture-of-Experts that routes with ONNX Runtime alone.

- :func:`export_onnx` writes one model (a plain CNN, a gate or an expert) with a dynamic batch dimension.
- :func:`quantize_onnx_int8` calibrates and writes its QDQ int8 twin (weights per channel).
- :class:`OrtModel` is one CPU session with a fixed thread count; :class:`OrtMoE` runs the gate, picks the
  top-k experts per sample and runs each chosen expert once on the samples routed to it.
- :func:`deploy_moe` writes a bundle folder (ONNX files + ``manifest.json`` with their SHA-256);
  :func:`load_bundle` refuses any file whose hash does not match.
- :func:`measure_moe_latency` times the deployed artifact with :func:`pipelines.measure.measure_latency`.

Example::

    manifest = deploy_moe(moe, Path("bundle"), calibration_images)
    bundle = load_bundle(Path("bundle"), threads=2)
    logits = bundle(images.numpy())
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from torch import nn

from pipelines.errors import ConfigError, DataError, UntrustedFileError, unknown_name
from pipelines.measure import measure_latency
from pipelines.moe import VIEWS, MixtureOfExperts, check_views
from pipelines.serialize import sha256_file

__all__ = [
    "OPSET",
    "export_onnx",
    "quantize_onnx_int8",
    "OrtModel",
    "OrtMoE",
    "deploy_moe",
    "load_bundle",
    "measure_moe_latency",
    "agreement",
]

OPSET = 17
FORMAT_VERSION = 1
BUNDLE_KIND = "hycomp-moe"
PRECISIONS = ("fp32", "int8")
# An expert calibrated on fewer routed images than this gets all calibration images instead: a handful
# of samples gives activation ranges that clip the inputs it will meet later.
MIN_EXPERT_CALIBRATION = 32
_CALIBRATION_BATCH = 32
_QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger"}
)


def _as_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Contiguous float32 (B, C, H, W) array from a tensor or an array."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim != 4:
        raise DataError(
            f"images: expected a (batch, channels, height, width) array, got shape {array.shape}."
        )
    return array


def export_onnx(module: nn.Module, example_input: torch.Tensor, path: Path) -> Path:
    """Export ``module`` (in eval mode) to ONNX with input ``input`` and output ``output``, batch dynamic.

    Example: ``export_onnx(model, images[:2], Path("model.onnx"))``.
    """
    path = Path(path)
    if not isinstance(example_input, torch.Tensor) or example_input.ndim != 4 or example_input.shape[0] == 0:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input)
        raise DataError(f"example_input: expected a non-empty (batch, C, H, W) tensor, got {shape}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        # The TorchScript exporter (dynamo=False): on torch 2.14 it exports a resnet8 in ~0.15 s and
        # folds BatchNorm into the convs in eval mode. The torch.export-based default takes ~4.6 s, prints
        # progress, and cannot emit opset 17 (it falls back to 18 after a failed version conversion).
        # The exporter's deprecation notice is silenced; tracer warnings (data-dependent control flow)
        # still show, because they mean the export may be wrong.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                module,
                (example_input.detach().cpu(),),
                str(path),
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        module.train(was_training)
    return path


class _ImageReader(CalibrationDataReader):
    """Feeds calibration images to ONNX Runtime's calibrator in fixed-size batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = _CALIBRATION_BATCH) -> None:
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self._batches: Iterator[np.ndarray] = self._iterate()

    def _iterate(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size]

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = self._iterate()


def quantize_onnx_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration_images: torch.Tensor | np.ndarray,
    *,
    wide_weights: str = "first",
) -> Path:
    """Statically quantize an fp32 ONNX model to QDQ int8 (per-channel int8 weights, uint8 activations).

    Activation ranges come from MinMax calibration on ``calibration_images`` (B, C, H, W). The final
    linear layer stays fp32 (see :func:`_classifier_nodes`). Weights that NNI left on a grid of at most
    129 levels (2- to 7-bit, and any coarser) are carried exactly (see :func:`_weight_grid_overrides`).
    ``reduce_range`` keeps weights to [-64, 64]: on AVX2 without VNNI the uint8 x int8 kernels saturate
    intermediate sums otherwise (accuracy 0.963 -> 0.910 measured; with it no loss, same speed).
    ``wide_weights`` says which layers with 8-bit weights (more levels than that range) are held exactly
    as uint8 weights by slower uint8 x uint8 kernels: ``"first"`` the layers that read the model input,
    ``"all"``, or ``"none"``; the others are rounded to the range.
    """
    _quantize(Path(fp32_path), Path(int8_path), calibration_images, wide_weights)
    return Path(int8_path)


WIDE_WEIGHT_POLICIES = ("first", "all", "none")


def _quantize(
    fp32_path: Path,
    int8_path: Path,
    calibration_images: torch.Tensor | np.ndarray,
    wide_weights: str,
) -> dict:
    """:func:`quantize_onnx_int8`; returns ``{"exact": [...], "rounded": [...]}``, the weight tensors the
    engine holds exactly and those it rounds to its own grid."""
    if wide_weights not in WIDE_WEIGHT_POLICIES:
        raise unknown_name("wide_weights", wide_weights, WIDE_WEIGHT_POLICIES)
    if not fp32_path.exists():
        raise DataError(f"fp32_path: {fp32_path} does not exist; export the model with export_onnx first.")
    images = _as_array(calibration_images)
    if len(images) == 0:
        raise DataError("calibration_images: empty; pass at least one image (a few hundred is typical).")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    quantization_logger = logging.getLogger("onnxruntime.quantization")
    root_logger = logging.getLogger()
    previous_levels = (quantization_logger.level, root_logger.level)
    with tempfile.TemporaryDirectory(prefix="hycomp-quant-") as scratch:
        preprocessed = Path(scratch) / "preprocessed.onnx"
        try:
            # The quantizer logs through the root logger (e.g. "Please consider to run pre-processing").
            quantization_logger.setLevel(logging.ERROR)
            root_logger.setLevel(max(root_logger.level, logging.ERROR))
            quant_pre_process(str(fp32_path), str(preprocessed))
            model = onnx.load(str(preprocessed))
            excluded = _classifier_nodes(model)
            overrides, rounded = _weight_grid_overrides(model, excluded, wide_weights)
            quantize_static(
                str(preprocessed),
                str(int8_path),
                _ImageReader(input_name, images),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded,
                extra_options={"TensorQuantOverrides": overrides},
            )
        finally:
            quantization_logger.setLevel(previous_levels[0])
            root_logger.setLevel(previous_levels[1])
    return {"exact": sorted(overrides), "rounded": rounded}


# Symmetric int8 weights with reduce_range hold the integers [-64, 64] (ONNX Runtime's reduced range);
# symmetric uint8 weights (zero point 128) hold [-127, 127], every 8-bit NNI level.
ENGINE_WEIGHT_LEVEL = 64
WIDE_WEIGHT_LEVEL = 127
_GRID_TOLERANCE = 1e-3  # largest |w / step - round(w / step)| still counted as on the grid


def _channel_step(values: np.ndarray, max_level: int = ENGINE_WEIGHT_LEVEL) -> float | None:
    """The coarsest step ``s`` with every ``values / s`` an integer in [-max_level, max_level], or None.

    NNI bakes each output channel onto ``scale * k`` with integer ``|k| <= 2**(bits-1) - 1``; BatchNorm
    folding multiplies the channel by a constant, which keeps it on a (rescaled) grid. Trying ``m`` =
    1, 2, ... levels for the channel's largest weight finds that grid when it fits the engine's range.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest == 0.0:
        return 1.0  # an all-zero channel (pruned to nothing): any step holds it exactly
    for levels in range(1, max_level + 1):
        ratio = values * (levels / largest)
        if float(np.abs(ratio - np.round(ratio)).max()) < _GRID_TOLERANCE:
            return largest / levels
    return None


def _weight_grid_overrides(
    model: onnx.ModelProto, excluded: list[str], wide_weights: str = "first"
) -> tuple[dict, list[str]]:
    """Per-channel scales that put each Conv / Gemm weight on ONNX Runtime's weight grid exactly.

    Left to itself, the quantizer rescales every channel to its own [-64, 64] grid: NNI's 6-bit levels
    (multiples of absmax / 31) then land between engine levels and are rounded a second time. On a
    4-expert 6-bit BloodMNIST MoE (whole val split, same latency), carrying the grid over raised
    int8-vs-torch agreement from 0.9883 to 0.9947 and engine accuracy from 0.9527 to 0.9550; holding its
    8-bit gate and first convs exactly too (``wide_weights``) raised them to 0.9977 and 0.9603.
    8-bit weights (255 levels) fit only uint8 weights, whose uint8 x uint8 kernels ran a fully 8-bit
    ResNet-20 2.3x slower here (0.62 vs 0.27 ms): they are exact only where ``wide_weights`` says
    (see :func:`quantize_onnx_int8`) and otherwise left to the quantizer and listed as rounded.
    Returns (``TensorQuantOverrides`` for ``quantize_static``, names of the rounded weight tensors).
    """
    graph_inputs = {value.name for value in model.graph.input}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    overrides: dict[str, list[dict]] = {}
    rounded: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name in excluded or len(node.input) < 2:
            continue
        weight_name = node.input[1]
        if weight_name not in initializers or weight_name in overrides:
            continue
        weight = numpy_helper.to_array(initializers[weight_name])
        axis = 0  # output channels: Conv (out, in, kh, kw); Gemm with transB (out, in)
        if node.op_type == "Gemm":
            trans_b = next((attr for attr in node.attribute if attr.name == "transB"), None)
            axis = 0 if trans_b is not None and onnx.helper.get_attribute_value(trans_b) else 1
        channels = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        # int8 levels for the fast kernels; uint8 (every 8-bit level, slower kernels) where wide_weights allows
        encodings = [(ENGINE_WEIGHT_LEVEL, {"zero_point": np.int8(0)})]
        if wide_weights == "all" or (wide_weights == "first" and node.input[0] in graph_inputs):
            encodings.append(
                (WIDE_WEIGHT_LEVEL, {"quant_type": QuantType.QUInt8, "zero_point": np.uint8(128)})
            )
        for max_level, encoding in encodings:
            steps = [_channel_step(channel, max_level) for channel in channels]
            if all(step is not None for step in steps):
                overrides[weight_name] = [
                    {"axis": axis, "scale": np.float32(step), **encoding} for step in steps
                ]
                break
        else:
            rounded.append(weight_name)
    return overrides, rounded


def _classifier_nodes(model: onnx.ModelProto) -> list[str]:
    """The last Gemm / MatMul of the graph (the classifier, or the gate's scoring layer), kept in fp32.

    Its uint8 output rounds close logits together and flips the argmax: on a 3-expert top-1 BloodMNIST MoE
    int8-vs-torch agreement rose from 0.985 to 0.990 with it in fp32, accuracy 0.940 -> 0.943; it is a
    few hundred MACs.
    """
    linear = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    return linear[-1:]


class OrtModel:
    """One ONNX Runtime CPU session: ``threads`` intra-op threads, one inter-op thread, sequential.

    Example: ``logits = OrtModel(Path("model.int8.onnx"), threads=2)(images)``.
    """

    def __init__(self, path: Path, threads: int = 1) -> None:
        path = Path(path)
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: {threads!r} must be a positive integer (the intra-op thread count).")
        if not path.exists():
            raise DataError(f"ONNX model {path} does not exist.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.path = path
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        graph = onnx.load(str(path), load_external_data=False).graph
        self.precision = "int8" if any(node.op_type in _QUANTIZED_OPS for node in graph.node) else "fp32"

    @property
    def num_outputs(self) -> int | None:
        """Size of the output's last dimension (classes or experts), when the file states it."""
        size = self.session.get_outputs()[0].shape[-1]
        return size if isinstance(size, int) else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) -> logits (B, classes)."""
        return self.session.run([self.output_name], {self.input_name: _as_array(images)})[0]

    def __repr__(self) -> str:
        return f"OrtModel({str(self.path)!r}, threads={self.threads}, precision={self.precision!r})"


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class OrtMoE:
    """A Mixture-of-Experts served by ONNX Runtime alone; matches ``MixtureOfExperts.forward`` in eval mode.

    Each call runs the gate on the whole batch, then each used expert once on the samples routed to it.
    With ``views`` > 1 the batch is first expanded into that many symmetric views (the order of
    :func:`pipelines.data.symmetry_views`) and the logits of a sample's views are averaged.
    ``last_timing`` holds the seconds of the last call: ``experts`` (expert sessions only),
    ``gate_and_routing`` (everything else: gate, softmax, top-k, gathering and combining) and ``total``.
    """

    def __init__(self, gate: OrtModel, experts: list[OrtModel], top_k: int, views: int = 1) -> None:
        if not experts:
            raise ConfigError("experts: the list is empty; an OrtMoE needs at least one expert.")
        if not 1 <= top_k <= len(experts):
            raise ConfigError(f"top_k: {top_k} must be between 1 and the number of experts ({len(experts)}).")
        gate_outputs = gate.num_outputs
        if gate_outputs is not None and gate_outputs != len(experts):
            raise ConfigError(
                f"gate: it scores {gate_outputs} experts but {len(experts)} experts were given."
            )
        check_views(views, "views")
        self.gate = gate
        self.experts = list(experts)
        self.top_k = top_k
        self.views = views
        self.last_timing: dict[str, float] = {}
        self.manifest: dict | None = None  # set by load_bundle

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def precision(self) -> str:
        """``int8`` or ``fp32`` when all sessions agree, else ``mixed``."""
        kinds = {model.precision for model in (self.gate, *self.experts)}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def threads(self) -> int:
        """The intra-op thread count of the sessions (``ConfigError`` if they differ)."""
        counts = {model.threads for model in (self.gate, *self.experts)}
        if len(counts) != 1:
            raise ConfigError(
                f"OrtMoE sessions use different thread counts {sorted(counts)}; load them alike."
            )
        return counts.pop()

    def route(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chosen expert ids (B, k) int64, best first; combine weights (B, k) float32, rows sum to 1)."""
        probabilities = _softmax(self.gate(images))
        # A stable sort of -p gives torch.topk's order (descending, lowest index first on ties).
        chosen = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        top_values = np.take_along_axis(probabilities, chosen, axis=1)
        weights = (top_values / top_values.sum(axis=1, keepdims=True)).astype(np.float32)
        return chosen.astype(np.int64), weights

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) -> combined logits (B, classes), averaged over the test-time views."""
        started = time.perf_counter()
        images = _as_array(images)
        if self.views == 1 or len(images) == 0:
            return self._routed(images, started)
        output = self._routed(_symmetry_views(images, self.views), started)
        return output.reshape(self.views, len(images), -1).mean(axis=0)

    def _routed(self, images: np.ndarray, started: float) -> np.ndarray:
        if self.num_experts == 1:  # the gate has one choice: skip it, as MixtureOfExperts.forward does
            output = self.experts[0](images)
            total = time.perf_counter() - started
            self.last_timing = {"gate_and_routing": 0.0, "experts": total, "total": total}
            return output
        chosen, weights = self.route(images)
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
        self.last_timing = {
            "gate_and_routing": total - expert_seconds,
            "experts": expert_seconds,
            "total": total,
        }
        if output is None:  # an empty batch: no expert ran
            output = np.zeros((0, self.experts[0].num_outputs or 0), dtype=np.float32)
        return output

    def __repr__(self) -> str:
        return (
            f"OrtMoE(num_experts={self.num_experts}, top_k={self.top_k}, views={self.views}, "
            f"precision={self.precision!r})"
        )


def _symmetry_views(images: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` symmetric views of a (B, C, H, W) batch stacked view-major, in the order of
    :func:`pipelines.data.symmetry_views` (identity, flip W, flip H, both, then their transposes)."""
    views = [images, images[..., ::-1], images[..., ::-1, :], images[..., ::-1, ::-1]]
    views += [view.swapaxes(-1, -2) for view in views]
    return np.ascontiguousarray(np.concatenate(views[:count]))


def _file_names(num_experts: int, precision: str) -> tuple[str, list[str]]:
    suffix = ".int8.onnx" if precision == "int8" else ".onnx"
    return f"gate{suffix}", [f"expert_{index}{suffix}" for index in range(num_experts)]


def _reserved_keys() -> set[str]:
    return {
        "format_version",
        "kind",
        "top_k",
        "num_experts",
        "input_shape",
        "files",
        "precision",
        "calibration",
        "weight_grid",
        "views",
    }


def deploy_moe(
    moe: MixtureOfExperts,
    folder: Path,
    calibration_images: torch.Tensor,
    *,
    int8: bool = True,
    extra_manifest: dict | None = None,
) -> dict:
    """Write ``moe`` as a bundle: ``gate.onnx``, ``expert_<i>.onnx`` and, with ``int8``, their ``*.int8.onnx``
    twins, plus ``manifest.json`` (file hashes, top_k, test-time views, input shape, precision). Returns the
    manifest.

    The int8 gate is calibrated on all ``calibration_images``; each int8 expert on the images the torch
    gate routes to it (any of its top-k slots), or on all of them when fewer than
    ``MIN_EXPERT_CALIBRATION`` are routed there.
    """
    folder = Path(folder)
    extra_manifest = dict(extra_manifest or {})
    clashes = sorted(_reserved_keys() & extra_manifest.keys())
    if clashes:
        raise ConfigError(f"extra_manifest: keys {clashes} are written by deploy_moe; rename them.")
    if (
        not isinstance(calibration_images, torch.Tensor)
        or calibration_images.ndim != 4
        or len(calibration_images) == 0
    ):
        raise DataError("calibration_images: expected a non-empty (N, C, H, W) tensor.")
    calibration_images = calibration_images.detach().cpu().float()
    folder.mkdir(parents=True, exist_ok=True)
    was_training = moe.training
    moe.eval()
    try:
        example = calibration_images[:2]
        fp32_gate, fp32_experts = _file_names(moe.num_experts, "fp32")
        export_onnx(moe.gate, example, folder / fp32_gate)
        for expert, name in zip(moe.experts, fp32_experts, strict=True):
            export_onnx(expert, example, folder / name)
        written = [fp32_gate, *fp32_experts]
        calibration: dict[str, int] = {}
        weight_grid: dict[str, dict[str, int]] = {}
        if int8:
            int8_gate, int8_experts = _file_names(moe.num_experts, "int8")
            # The gate is a few percent of the MoE's MACs: all its 8-bit weights are held exactly.
            grid = _quantize(folder / fp32_gate, folder / int8_gate, calibration_images, "all")
            weight_grid[int8_gate] = {key: len(names) for key, names in grid.items()}
            calibration[int8_gate] = len(calibration_images)
            with torch.no_grad():
                _, chosen, _ = moe.route(calibration_images)
            for expert_id, (fp32_name, int8_name) in enumerate(zip(fp32_experts, int8_experts, strict=True)):
                routed = calibration_images[(chosen == expert_id).any(dim=1)]
                images = routed if len(routed) >= MIN_EXPERT_CALIBRATION else calibration_images
                grid = _quantize(folder / fp32_name, folder / int8_name, images, "first")
                weight_grid[int8_name] = {key: len(names) for key, names in grid.items()}
                calibration[int8_name] = len(images)
            written += [int8_gate, *int8_experts]
    finally:
        moe.train(was_training)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": BUNDLE_KIND,
        "top_k": moe.top_k,
        "num_experts": moe.num_experts,
        "views": moe.views,
        "input_shape": list(calibration_images.shape[1:]),
        "files": {name: sha256_file(folder / name) for name in written},
        "precision": "int8" if int8 else "fp32",
        "calibration": calibration,  # int8 file -> number of calibration images it saw
        # int8 file -> weight tensors held exactly on the engine grid / rounded to it (8-bit, fp32)
        "weight_grid": weight_grid,
        **extra_manifest,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise UntrustedFileError(
            f"{path} is missing; {folder} is not a hycomp bundle (write one with deploy_moe)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UntrustedFileError(f"{path} is not valid JSON ({error}).") from error
    problems = []
    if not isinstance(manifest, dict):
        raise UntrustedFileError(f"{path} is malformed: expected a JSON object.")
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {manifest.get('format_version')!r} (expected {FORMAT_VERSION})")
    if manifest.get("kind") != BUNDLE_KIND:
        problems.append(f"kind {manifest.get('kind')!r} (expected {BUNDLE_KIND!r})")
    for key in ("top_k", "num_experts"):
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key} {value!r} (expected a positive integer)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(value, str) for value in files.values()):
        problems.append("files (expected an object of file name -> sha256)")
    if manifest.get("views", 1) not in VIEWS:  # bundles written before test-time views have none: 1
        problems.append(f"views {manifest.get('views')!r} (expected one of {list(VIEWS)})")
    if manifest.get("precision") not in PRECISIONS:
        problems.append(f"precision {manifest.get('precision')!r} (expected one of {list(PRECISIONS)})")
    if problems:
        raise UntrustedFileError(f"{path} is malformed: {'; '.join(problems)}.")
    return manifest


def _verified(folder: Path, name: str, files: dict[str, str]) -> Path:
    path = folder / name
    if not path.exists():
        raise UntrustedFileError(f"{path} listed in the manifest is missing; re-deploy the bundle.")
    actual = sha256_file(path)
    if actual != files[name]:
        raise UntrustedFileError(
            f"{path} was modified: sha256 {actual[:12]}… does not match the manifest's {files[name][:12]}…. "
            "Refusing to load it; re-deploy the bundle."
        )
    return path


def load_bundle(folder: Path, threads: int = 1, precision: str | None = None) -> OrtMoE:
    """Load a bundle written by :func:`deploy_moe` after checking every ONNX file against its SHA-256.

    ``precision`` picks ``fp32`` or ``int8`` files (default: the manifest's). Example:
    ``bundle = load_bundle(Path("bundle"), threads=2)``.
    """
    folder = Path(folder)
    if precision is not None and precision not in PRECISIONS:
        raise unknown_name("precision", precision, PRECISIONS)
    manifest = _read_manifest(folder)
    chosen_precision = precision or manifest["precision"]
    gate_name, expert_names = _file_names(manifest["num_experts"], chosen_precision)
    files = manifest["files"]
    missing = [name for name in (gate_name, *expert_names) if name not in files]
    if missing:
        if chosen_precision != manifest["precision"]:
            raise ConfigError(
                f"precision: the bundle in {folder} has no {chosen_precision} files (it was deployed as "
                f"{manifest['precision']}); load it with precision={manifest['precision']!r} or re-deploy."
            )
        raise UntrustedFileError(f"{folder / 'manifest.json'} is malformed: it lists no hash for {missing}.")
    gate = OrtModel(_verified(folder, gate_name, files), threads)
    experts = [OrtModel(_verified(folder, name, files), threads) for name in expert_names]
    bundle = OrtMoE(gate, experts, manifest["top_k"], manifest.get("views", 1))
    bundle.manifest = manifest
    return bundle


def backend_label(model: OrtModel | OrtMoE) -> str:
    """e.g. ``onnxruntime-int8 (CPUExecutionProvider)``."""
    return f"onnxruntime-{model.precision} (CPUExecutionProvider)"


def measure_moe_latency(
    bundle: OrtMoE | OrtModel,
    images: np.ndarray,
    *,
    threads: int,
    batch: int,
    repeats: int = 30,
    warmup: int = 5,
) -> dict:
    """Latency of ``bundle`` on the first ``batch`` of ``images`` with the shared harness, plus the median
    share of each call spent outside the experts (gate and routing).

    ``threads`` must equal the thread count the sessions were created with (it is recorded, not set).
    A plain :class:`OrtModel` (a single CNN) is timed the same way; its ``routing_share`` is ``None``.
    Returns ``{"latency": LatencyStats.as_dict(), "routing_share": float | None}``.
    """
    if batch < 1:
        raise ConfigError(f"batch: {batch} must be >= 1.")
    session_threads = bundle.threads
    if threads != session_threads:
        raise ConfigError(
            f"threads: {threads} differs from the {session_threads} thread(s) the sessions were created with; "
            f"load the bundle with threads={threads} or pass threads={session_threads}."
        )
    array = _as_array(images)
    if len(array) < batch:
        raise DataError(f"images: batch {batch} needs at least {batch} images, got {len(array)}.")
    array = np.ascontiguousarray(array[:batch])
    shares: list[float] = []

    def run() -> object:
        output = bundle(array)
        if isinstance(bundle, OrtMoE):
            timing = bundle.last_timing
            shares.append(timing["gate_and_routing"] / timing["total"] if timing["total"] > 0 else 0.0)
        return output

    stats = measure_latency(
        run, backend=backend_label(bundle), threads=threads, batch=batch, warmup=warmup, repeats=repeats
    )
    routing_share = float(np.median(shares[warmup:])) if shares else None
    return {"latency": stats.as_dict(), "routing_share": routing_share}


def agreement(
    torch_model: nn.Module, ort_model: OrtModel | OrtMoE, images: torch.Tensor, batch_size: int = 256
) -> dict:
    """How closely ``ort_model`` reproduces ``torch_model`` (eval mode) on ``images``:
    ``{"max_abs_diff": largest logit difference, "top1_agreement": fraction of equal argmax}``."""
    images = torch.as_tensor(images).detach().cpu().float()
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"images: expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
    was_training = torch_model.training
    torch_model.eval()
    max_abs_diff, agreeing = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                expected = torch_model(chunk).numpy()
                actual = ort_model(chunk.numpy())
                max_abs_diff = max(max_abs_diff, float(np.abs(expected - actual).max()))
                agreeing += int((expected.argmax(axis=1) == actual.argmax(axis=1)).sum())
    finally:
        torch_model.train(was_training)
    return {"max_abs_diff": max_abs_diff, "top1_agreement": agreeing / len(images)}
