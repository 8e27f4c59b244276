"""pipelines.deploy.int8: static int8 quantization that carries NNI's weight grid."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from pipelines.deploy.bundle import agreement
from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel
from pipelines.errors import ConfigError
from tests.pipelines_tests.deploy_tests.support import CALIBRATION, _bake_on_grid, _engine_weight_errors


def test_int8_single_model_is_smaller_and_agrees(classifier: nn.Module, data, tmp_path: Path) -> None:
    images, labels = data
    fp32_path = export_onnx(classifier, images[:2], tmp_path / "model.onnx")
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "model.int8.onnx", images[:CALIBRATION])
    operators = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators
    assert int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size  # int8 weights, not fp32
    # the classifier (last Gemm) reads dequantized features but keeps fp32 weights and an fp32 output
    graph = onnx.load(str(int8_path)).graph
    last = [node for node in graph.node if node.op_type in ("Gemm", "MatMul")][-1]
    float_initializers = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    assert last.input[1] in float_initializers
    assert not any(node.op_type == "QuantizeLinear" and last.output[0] in node.input for node in graph.node)
    model = OrtModel(int8_path, threads=1)
    assert model.precision == "int8"
    held_out = images[CALIBRATION:]
    with torch.no_grad():
        assert (
            classifier(held_out).argmax(1) == labels[CALIBRATION:]
        ).float().mean() == 1.0  # well separated
    result = agreement(classifier, model, held_out)
    # Measured: agreement 1.0, max |diff| 0.57 on logits whose top-2 margin has median 6.7.
    assert result["top1_agreement"] >= 0.95
    assert 0 < result["max_abs_diff"] < 1.5


@pytest.mark.parametrize(
    "bits,wide_weights,exact",
    [
        (4, "first", "all"),
        (6, "none", "all"),
        # 255 levels do not fit the fast kernels' [-64, 64]: rounded, except the conv reading the image,
        # which stays fp32 under every policy (float_layers)
        (8, "none", "first"),
        (8, "first", "first"),
        (8, "all", "all"),
    ],
)
def test_int8_engine_holds_nni_weight_grid_exactly(
    classifier: nn.Module, data, tmp_path: Path, bits: int, wide_weights: str, exact: str
) -> None:
    """Weights NNI left on <= 129 levels reach the engine unchanged; 8-bit ones where ``wide_weights`` says."""
    images = data[0]
    model = _bake_on_grid(copy.deepcopy(classifier), bits).eval()
    fp32_path = export_onnx(model, images[:2], tmp_path / "model.onnx")
    int8_path = quantize_onnx_int8(
        fp32_path, tmp_path / "model.int8.onnx", images[:CALIBRATION], wide_weights=wide_weights
    )
    errors = _engine_weight_errors(fp32_path, int8_path)
    expected_exact = {"all": [True] * len(errors), "none": [False] * len(errors)}.get(
        exact, [True] + [False] * (len(errors) - 1)
    )
    for error, is_exact in zip(errors, expected_exact, strict=True):
        if is_exact:
            assert error < 1e-5
        else:  # rounded to the engine's grid: off by at most half its step (absmax / 128)
            assert 1e-4 < error <= 0.5 / 64 + 1e-6
    with pytest.raises(ConfigError, match="wide_weights"):
        quantize_onnx_int8(fp32_path, tmp_path / "x.onnx", images[:CALIBRATION], wide_weights="some")


def test_the_stem_on_few_input_channels_stays_fp32_and_the_rest_is_int8(
    classifier, data, tmp_path: Path
) -> None:
    """The conv that reads the 3-channel image keeps float weights (int8 kernels are slower there); every other
    conv runs int8; a conv reading a many-channel input (a shared-trunk expert's feature map) is int8 too."""
    import numpy as np

    from pipelines.deploy.int8 import float_layers

    images = data[0]
    fp32_path = export_onnx(classifier.eval(), images[:2], tmp_path / "model.onnx")
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "model.int8.onnx", images[:CALIBRATION])
    graph = onnx.load(str(int8_path)).graph
    floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    inputs = {value.name for value in graph.input}
    stems = [node for node in convs if node.input[0] in inputs]
    assert len(convs) > 1 and len(stems) == 1 and stems[0].input[1] in floats  # float weights on the image
    assert all(
        node.input[1] not in floats for node in convs if node not in stems
    )  # the rest via DequantizeLinear
    source = onnx.load(str(fp32_path))
    assert float_layers(source) == [node.name for node in source.graph.node if node.op_type == "Conv"][:1]
    wide = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="wide", kernel_shape=[3, 3])],
        "wide",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.zeros((8, 16, 3, 3), np.float32), "w")],
    )
    assert float_layers(onnx.helper.make_model(wide)) == []
