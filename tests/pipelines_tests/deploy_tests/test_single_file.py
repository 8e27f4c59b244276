"""pipelines.deploy.single_file: the one-file MoE reproduces the per-expert bundle with numpy routing on
plain ONNX Runtime and on OpenVINO, runs only the experts a row is routed to, and keeps int8 kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipelines import symmetry
from pipelines.deploy.engines import OpenVinoModel
from pipelines.deploy.int8 import float_layers
from pipelines.deploy.manifest import file_names, trunk_file_name
from pipelines.deploy.runtime import BundleMoE, OrtModel, OrtMoE, load_bundle, load_single_file
from pipelines.deploy.single_file import merge_moe_onnx
from pipelines.errors import ConfigError
from tests.pipelines_tests.deploy_tests.support import CALIBRATION


def _merged(folder: Path, precision: str, top_k: int, views: int, out: Path) -> tuple[Path, OrtMoE]:
    """(merged file of the bundle's files at ``precision``, the numpy-routed OrtMoE of the same files)."""
    gate_name, expert_names = file_names(3, precision)
    path = merge_moe_onnx(folder / gate_name, [folder / name for name in expert_names], top_k, views, out)
    glue = OrtMoE(
        OrtModel(folder / gate_name), [OrtModel(folder / name) for name in expert_names], top_k, views
    )
    return path, glue


def _plain(path: Path, images: np.ndarray) -> np.ndarray:
    """The merged file run by a bare ONNX Runtime session: no hycomp code between the file and the logits."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize(("top_k", "views"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_one_file_reproduces_the_numpy_routed_bundle(
    int8_bundle, data, tmp_path, precision, top_k, views
) -> None:
    _, folder, _ = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    path, glue = _merged(folder, precision, top_k, views, tmp_path / "model.onnx")
    expected, actual = glue(images), _plain(path, images)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert (actual.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_deployed_model_onnx_is_the_bundle(int8_bundle, data) -> None:
    _, folder, manifest = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    _, glue = _merged(folder, "int8", manifest.top_k, manifest.views, folder / "unused.onnx")
    single = load_single_file(folder)
    assert single.precision == "int8"
    np.testing.assert_allclose(_plain(folder / manifest.single_file, images), glue(images), atol=1e-5)
    np.testing.assert_allclose(single(images), glue(images), atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_mixed_batch_equals_each_image_alone(int8_bundle, data, tmp_path, precision) -> None:
    _, folder, _ = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    path, glue = _merged(folder, precision, 1, 2, tmp_path / "model.onnx")
    chosen, _ = glue.route(np.concatenate(symmetry.views(images, 2)))
    assert len(np.unique(chosen)) >= 2  # the batch really mixes experts (and views routed apart)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batched = session.run(None, {"input": images})[0]
    alone = np.concatenate(
        [session.run(None, {"input": images[index : index + 1]})[0] for index in range(len(images))]
    )
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_one_expert_skips_the_gate(int8_bundle, data, tmp_path) -> None:
    _, folder, _ = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    path = merge_moe_onnx(None, [folder / "expert_1.int8.onnx"], 1, 2, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    assert not {"If", "TopK", "Softmax"} & {node.op_type for node in graph.node}
    expert = OrtModel(folder / "expert_1.int8.onnx")
    expected = np.mean([expert(np.ascontiguousarray(view)) for view in symmetry.views(images, 2)], axis=0)
    np.testing.assert_allclose(_plain(path, images), expected, atol=1e-5)


def _bodies(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every If body of ``graph``, nested ones included."""
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found += [attribute.g, *_bodies(attribute.g)]
    return found


@pytest.mark.parametrize("top_k", [1, 2])
def test_int8_branches_keep_quantized_kernels_after_optimization(int8_bundle, tmp_path, top_k) -> None:
    _, folder = int8_bundle[:2]
    path, _ = _merged(folder, "int8", top_k, 1, tmp_path / "model.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    bodies = _bodies(onnx.load(str(tmp_path / "optimized.onnx")).graph)
    ops = [node.op_type for body in bodies for node in body.node]
    experts = [onnx.load(str(folder / f"expert_{index}.onnx")) for index in range(3)]
    convs = sum(node.op_type == "Conv" for expert in experts for node in expert.graph.node)
    stems = sum(len(float_layers(expert)) for expert in experts)  # on the 3-channel image: fp32 by design
    # every other conv of every expert runs as an int8 kernel; only the classifiers dequantize
    assert stems == 3 and ops.count("QLinearConv") == convs - stems, ops
    assert ops.count("Conv") == stems and "DequantizeLinear" in ops


@pytest.mark.parametrize("top_k", [1, 2])
def test_expert_weights_are_stored_once(int8_bundle, tmp_path, top_k) -> None:
    _, folder = int8_bundle[:2]
    path, _ = _merged(folder, "int8", top_k, 1, tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    expected = sorted(
        f"expert_{index}/{initializer.name}"
        for index in range(3)
        for initializer in onnx.load(str(folder / f"expert_{index}.int8.onnx")).graph.initializer
    )
    stored = sorted(
        initializer.name
        for body in [graph, *_bodies(graph)]
        for initializer in body.initializer
        if initializer.name.startswith("expert_")
    )
    assert stored == expected  # each expert weight once, in its expert's If body


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_batch_one_runs_the_chosen_expert_for_each_expert(int8_bundle, data, tmp_path, engine) -> None:
    _, folder = int8_bundle[:2]
    images = data[0][CALIBRATION:].numpy()
    path, glue = _merged(folder, "int8", 1, 1, tmp_path / "model.onnx")
    model = OrtModel(path) if engine == "onnxruntime" else OpenVinoModel(path)
    chosen, _ = glue.route(images)
    for expert in range(3):
        index = int(np.nonzero(chosen[:, 0] == expert)[0][0])
        image = images[index : index + 1]
        expected = glue.experts[expert](image)  # top-1: the chosen expert's logits, weight 1
        tolerance = 1e-5 if engine == "onnxruntime" else 0.5 * np.abs(expected).max()
        np.testing.assert_allclose(model(image), expected, atol=tolerance)
    uniform = images[chosen[:, 0] == 2]  # a batch that chose one expert
    assert len(uniform) >= 2
    np.testing.assert_allclose(_plain(path, uniform), glue(uniform), atol=1e-5)


@pytest.mark.parametrize(("top_k", "views"), [(1, 2), (2, 1), (2, 2)])
def test_each_image_alone_equals_the_numpy_routing(int8_bundle, data, tmp_path, top_k, views) -> None:
    _, folder = int8_bundle[:2]
    images = data[0][CALIBRATION : CALIBRATION + 24].numpy()
    path, glue = _merged(folder, "int8", top_k, views, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for index in range(len(images)):
        image = images[index : index + 1]
        np.testing.assert_allclose(session.run(None, {"input": image})[0], glue(image), atol=1e-5)


def test_a_shared_trunk_top1_file_matches_the_numpy_routing(shared_bundle, data, tmp_path) -> None:
    _, folder = shared_bundle
    images = data[0][CALIBRATION:].numpy()
    bundle = load_bundle(folder)
    glue = BundleMoE(bundle.gate, bundle.experts, 1, bundle.views, trunk=bundle.trunk)
    gate_name, expert_names = file_names(3, "int8")
    path = merge_moe_onnx(
        folder / gate_name,
        [folder / name for name in expert_names],
        1,
        bundle.views,
        tmp_path / "model.onnx",
        trunk_path=folder / trunk_file_name("int8"),
    )
    np.testing.assert_allclose(_plain(path, images), glue(images), atol=1e-5)
    for index in range(8):
        image = images[index : index + 1]
        np.testing.assert_allclose(_plain(path, image), glue(image), atol=1e-5)


def test_openvino_runs_the_file(int8_bundle, data, tmp_path) -> None:
    _, folder, _ = int8_bundle
    images = data[0][CALIBRATION:].numpy()
    path, glue = _merged(folder, "fp32", 2, 2, tmp_path / "fp32.onnx")
    np.testing.assert_allclose(OpenVinoModel(path)(images), glue(images), atol=1e-4)
    path, glue = _merged(folder, "int8", 2, 2, tmp_path / "int8.onnx")
    openvino_logits, expected = OpenVinoModel(path)(images), glue(images)
    # OpenVINO's int8 arithmetic rounds differently (its gate logits move by ~0.1, which may swap a near tie
    # of the routing): the classes agree, the logits only roughly.
    assert (openvino_logits.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.9
    assert np.abs(openvino_logits - expected).max() < 0.5 * np.abs(expected).max()
    np.testing.assert_allclose(OpenVinoModel(path)(images[:1]), openvino_logits[:1], atol=1e-4)


def test_bad_arguments_are_named(int8_bundle, tmp_path) -> None:
    _, folder, _ = int8_bundle
    experts = [folder / f"expert_{index}.onnx" for index in range(3)]
    with pytest.raises(ConfigError, match="top_k: 4"):
        merge_moe_onnx(folder / "gate.onnx", experts, 4, 1, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="views: 3"):
        merge_moe_onnx(folder / "gate.onnx", experts, 1, 3, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="gate_path"):
        merge_moe_onnx(None, experts, 1, 1, tmp_path / "m.onnx")
