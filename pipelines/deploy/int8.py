"""ONNX Runtime static int8 quantization (QDQ, per-channel int8 weights, uint8 activations) that carries
NNI's low-bit weight grid into the engine exactly instead of rounding it a second time."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from pipelines.deploy.engines import as_array
from pipelines.errors import DataError, unknown_name

__all__ = ["quantize_onnx_int8", "quantize_with_grid", "WIDE_WEIGHT_POLICIES", "INT8_RECIPE", "float_layers"]

_CALIBRATION_BATCH = 32
# What an int8 file is made of, so that latencies of files made differently are never compared: 1 had
# every convolution in int8; 2 keeps the convolutions that read the image on few channels in fp32.
INT8_RECIPE = 2
FLOAT_INPUT_CHANNELS = 4  # a convolution on the model input with at most this many channels stays fp32


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
    calibration_images: np.ndarray,
    *,
    wide_weights: str = "first",
    float_stem: bool = True,
) -> Path:
    """Statically quantize an fp32 ONNX model to QDQ int8 (per-channel int8 weights, uint8 activations).

    Activation ranges come from MinMax calibration on ``calibration_images`` (B, C, H, W). The final
    linear layer and the convolutions that read a few-channel image stay fp32 (:func:`_classifier_nodes`,
    :func:`float_layers`). Weights that NNI left on a grid of at most
    129 levels (2- to 7-bit, and any coarser) are carried exactly (see :func:`_weight_grid_overrides`).
    ``reduce_range`` keeps weights to [-64, 64]: on AVX2 without VNNI the uint8 x int8 kernels saturate
    intermediate sums otherwise (README, "Conventions for the numbers").
    ``wide_weights`` says which layers with 8-bit weights (more levels than that range) are held exactly
    as uint8 weights by slower uint8 x uint8 kernels: ``"first"`` the layers that read the model input,
    ``"all"``, or ``"none"``; the others are rounded to the range.
    ``float_stem=False`` quantizes the stem too (:data:`INT8_RECIPE` 1; kept to compare the two).
    """
    quantize_with_grid(Path(fp32_path), Path(int8_path), calibration_images, wide_weights, float_stem)
    return Path(int8_path)


WIDE_WEIGHT_POLICIES = ("first", "all", "none")


def quantize_with_grid(
    fp32_path: Path,
    int8_path: Path,
    calibration_images: np.ndarray,
    wide_weights: str,
    float_stem: bool = True,
) -> dict:
    """:func:`quantize_onnx_int8`; returns ``{"exact": [...], "rounded": [...]}``, the weight tensors the
    engine holds exactly and those it rounds to its own grid."""
    if wide_weights not in WIDE_WEIGHT_POLICIES:
        raise unknown_name("wide_weights", wide_weights, WIDE_WEIGHT_POLICIES)
    if not fp32_path.exists():
        raise DataError(f"fp32_path: {fp32_path} does not exist; export the model with export_onnx first.")
    images = as_array(calibration_images)
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
            excluded = _classifier_nodes(model) + (float_layers(model) if float_stem else [])
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
    (multiples of absmax / 31) then land between engine levels and are rounded a second time, which costs
    agreement with the torch model. 8-bit weights (255 levels) fit only uint8 weights, whose slower
    uint8 x uint8 kernels are used only where ``wide_weights`` says (see :func:`quantize_onnx_int8`);
    elsewhere they are left to the quantizer and listed as rounded.
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

    Its uint8 output would round close logits together and flip the argmax; it is a few hundred MACs.
    """
    linear = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    return linear[-1:]


def float_layers(model: onnx.ModelProto) -> list[str]:
    """The ungrouped convolutions that read the model's input on at most :data:`FLOAT_INPUT_CHANNELS` channels
    (an RGB or grey stem), kept in fp32: int8 kernels gain nothing on so few input channels and run slower than
    the float ones on both engines, and fp32 holds any weight grid exactly."""
    inputs = {value.name for value in model.graph.input}
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type != "Conv" or not node.input or node.input[0] not in inputs or len(node.input) < 2:
            continue
        group = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "group"), 1)
        weight = initializers.get(node.input[1])
        if (
            group == 1
            and weight is not None
            and len(weight.dims) == 4
            and weight.dims[1] <= FLOAT_INPUT_CHANNELS
        ):
            kept.append(node.name)
    return kept
