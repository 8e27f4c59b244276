"""pipelines.deploy.engines: ONNX Runtime and OpenVINO run the same files to the same logits, at any batch
size, record what they are (engine, version, precision, threads), and refuse unknown or missing engines."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from pipelines.deploy import engines
from pipelines.deploy.engines import ENGINES, engine_available, engine_version, open_model
from pipelines.deploy.runtime import backend_label, load_bundle, measure_moe_latency
from pipelines.errors import ConfigError, DataError

pytest.importorskip("openvino")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_both_engines_give_the_same_logits(int8_bundle, data, precision: str) -> None:
    _, folder, _ = int8_bundle
    images = data[0].numpy()
    outputs = {engine: load_bundle(folder, precision=precision, engine=engine)(images) for engine in ENGINES}
    reference, other = outputs["onnxruntime"], outputs["openvino"]
    assert reference.shape == other.shape == (len(images), 8)
    assert (reference.argmax(axis=1) == other.argmax(axis=1)).mean() >= (1.0 if precision == "fp32" else 0.95)
    # fp32: the same arithmetic up to summation order; int8: the engines round requantized activations
    # differently, a few quantization steps of the logits at most.
    tolerance = 1e-4 if precision == "fp32" else 0.05 * np.abs(reference).max()
    np.testing.assert_allclose(other, reference, atol=tolerance)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["expert_0.onnx", "expert_0.int8.onnx", "gate.int8.onnx"])
def test_a_batch_equals_its_images_one_by_one(int8_bundle, data, engine: str, name: str) -> None:
    _, folder, _ = int8_bundle
    images = data[0].numpy()[:16]
    model = open_model(folder / name, engine=engine)
    together = model(images)
    alone = np.concatenate([model(images[index : index + 1]) for index in range(len(images))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert model(images[:3]).shape == (3, model.num_outputs)  # the batch size changes call to call


@pytest.mark.parametrize("engine", ENGINES)
def test_a_model_records_what_it_is(int8_bundle, engine: str) -> None:
    _, folder, _ = int8_bundle
    model = open_model(folder / "expert_1.int8.onnx", engine=engine, threads=2)
    version = metadata.version(engine)
    assert (model.engine, model.version, model.precision, model.threads) == (engine, version, "int8", 2)
    assert model.num_outputs == 8 and model.path == folder / "expert_1.int8.onnx"
    assert model.label() == f"{engine} {version} int8, 2 thread(s)"
    assert open_model(folder / "gate.onnx", engine=engine).precision == "fp32"
    assert engine_available(engine) and engine_version(engine) == version


def test_the_engines_get_the_thread_count(int8_bundle) -> None:
    _, folder, _ = int8_bundle
    onnxruntime = open_model(folder / "gate.onnx", "onnxruntime", threads=2)
    options = onnxruntime.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # idle threads sleep
    openvino = open_model(folder / "gate.onnx", "openvino", threads=2)
    assert openvino.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert openvino.compiled.get_property("NUM_STREAMS") == 1
    assert openvino.compiled.get_property("ENABLE_CPU_PINNING") is False
    with pytest.raises(ConfigError, match="threads"):
        open_model(folder / "gate.onnx", "openvino", threads=0)


def _runtime_precisions(model: engines.OpenVinoModel, layer_type: str) -> set[str]:
    runtime = model.compiled.get_runtime_model()
    return {
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == layer_type
    }


def test_openvino_runs_int8_files_in_int8_and_fp32_files_in_f32(int8_bundle) -> None:
    _, folder, _ = int8_bundle
    int8 = open_model(folder / "expert_0.int8.onnx", "openvino")
    precisions = _runtime_precisions(int8, "Convolution")
    # the stem on the 3-channel image is fp32 by design (pipelines.deploy.int8.float_layers); the rest int8
    assert {"u8", "i8"} & precisions and precisions <= {"u8", "i8", "f32"}
    runtime = int8.compiled.get_runtime_model()
    floats = [
        op
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
        and op.get_rt_info()["runtimePrecision"].astype(str) == "f32"
    ]
    assert len(floats) <= 1
    fp32 = open_model(folder / "expert_0.onnx", "openvino")
    assert _runtime_precisions(fp32, "Convolution") == {"f32"}  # not the CPU plugin's bf16 default


def test_a_bundle_on_openvino_is_labelled_and_timed(int8_bundle, data) -> None:
    _, folder, _ = int8_bundle
    bundle = load_bundle(folder, threads=1, engine="openvino")
    version = metadata.version("openvino")
    assert (bundle.engine, bundle.version, bundle.precision) == ("openvino", version, "int8")
    assert bundle.label() == f"openvino {version} int8, 1 thread(s)"
    assert backend_label(bundle) == f"openvino {version} int8 (CPU)"
    result = measure_moe_latency(bundle, data[0].numpy(), threads=1, batch=4, repeats=3, warmup=1)
    assert (result["engine"], result["engine_version"], result["threads"], result["batch"]) == (
        "openvino",
        version,
        1,
        4,
    )
    assert result["latency"]["backend"] == backend_label(bundle) and result["latency"]["batch"] == 4


def test_unknown_engines_are_refused(int8_bundle) -> None:
    _, folder, _ = int8_bundle
    for call in (
        lambda: open_model(folder / "gate.onnx", engine="tensorrt"),
        lambda: load_bundle(folder, engine="tensorrt"),
        lambda: engine_available("tensorrt"),
        lambda: engine_version("tensorrt"),
    ):
        with pytest.raises(
            ConfigError, match="engine: unknown value 'tensorrt'. Valid values: onnxruntime, openvino"
        ):
            call()


def test_a_missing_openvino_names_the_fix(int8_bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder, _ = int8_bundle
    engines._openvino_core.cache_clear()
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    try:
        with pytest.raises(ConfigError, match="pip install openvino"):
            open_model(folder / "gate.onnx", engine="openvino")
    finally:
        engines._openvino_core.cache_clear()


def test_engine_models_need_an_existing_file(tmp_path: Path) -> None:
    for engine in ENGINES:
        with pytest.raises(DataError, match="does not exist"):
            open_model(tmp_path / "missing.onnx", engine=engine)
