"""CPU inference engines behind one call: ONNX Runtime and OpenVINO each run an ONNX file (fp32 or int8 QDQ)
on a float32 (B, C, H, W) array and return its first output. Torch-free; OpenVINO is imported only when used.

Example::

    model = open_model(Path("expert_0.int8.onnx"), engine="openvino", threads=1)
    logits = model(images)
    model.label()  # 'openvino 2026.4.1 int8, 1 thread(s)'
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from pipelines.errors import ConfigError, DataError, unknown_name

__all__ = [
    "ENGINES",
    "EngineModel",
    "OpenVinoModel",
    "OrtModel",
    "as_array",
    "engine_available",
    "engine_version",
    "graph_precision",
    "open_model",
]

ENGINES = ("onnxruntime", "openvino")

QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "ConvInteger",
        "MatMulInteger",
    }
)


def as_array(images: Any) -> np.ndarray:
    """Contiguous float32 (B, C, H, W) array from an array or a torch tensor (without importing torch)."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    array = np.ascontiguousarray(images, dtype=np.float32)
    if array.ndim != 4:
        raise DataError(
            f"images: expected a (batch, channels, height, width) array, got shape {array.shape}."
        )
    return array


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise unknown_name("engine", engine, ENGINES)


def engine_available(engine: str) -> bool:
    """Whether ``engine``'s Python package is installed (``ConfigError`` for a name not in ``ENGINES``)."""
    _check_engine(engine)
    return importlib.util.find_spec(engine) is not None


def engine_version(engine: str) -> str | None:
    """The installed version of ``engine``'s package, e.g. ``2026.4.1`` (None when it is not installed)."""
    _check_engine(engine)
    try:
        return metadata.version(engine)
    except metadata.PackageNotFoundError:
        return None


def graph_precision(path: Path) -> str:
    """``int8`` if the ONNX graph holds quantization nodes (QDQ or QLinear*), else ``fp32``."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return "int8" if any(node.op_type in QUANTIZED_OPS for node in graph.node) else "fp32"


class EngineModel:
    """One ONNX file loaded into one engine: callable on float32 (B, C, H, W), returns the first output.

    Attributes: ``path``, ``engine``, ``threads``, ``precision`` (``int8`` / ``fp32``, from the graph),
    ``version`` (the engine's package version) and ``num_outputs``.
    """

    engine: str = ""

    def __init__(self, path: Path, threads: int = 1) -> None:
        path = Path(path)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads: {threads!r} must be a positive integer (the intra-op thread count).")
        if not path.exists():
            raise DataError(f"ONNX model {path} does not exist.")
        self.path = path
        self.threads = threads
        self.precision = graph_precision(path)
        self.version = engine_version(self.engine) or "unknown"

    @property
    def num_outputs(self) -> int | None:
        """Size of the output's last dimension (classes or experts), when the file states it."""
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) -> first output (B, classes)."""
        raise NotImplementedError

    def label(self) -> str:
        """e.g. ``openvino 2026.4.1 int8, 1 thread(s)``."""
        return f"{self.engine} {self.version} {self.precision}, {self.threads} thread(s)"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, threads={self.threads}, precision={self.precision!r})"
        )


class OrtModel(EngineModel):
    """One ONNX Runtime CPU session tuned for small-batch latency: ``threads`` intra-op threads, one inter-op
    thread, sequential execution, all graph optimizations; with several threads the pool's spin-wait is
    off, so idle workers do not burn the CPU that the other process (or engine) being compared needs.

    Example: ``logits = OrtModel(Path("model.int8.onnx"), threads=2)(images)``.
    """

    engine = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__(path, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        if threads > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def num_outputs(self) -> int | None:
        size = self.session.get_outputs()[0].shape[-1]
        return size if isinstance(size, int) else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: as_array(images)})[0]


@functools.cache
def _openvino_core() -> Any:
    """One OpenVINO Core per process (creating one loads the device plugins)."""
    try:
        import openvino
    except ImportError:
        raise ConfigError(
            "engine: 'openvino' is not installed. Install it with `pip install openvino` "
            "or pick engine 'onnxruntime'."
        ) from None
    return openvino.Core()


class OpenVinoModel(EngineModel):
    """One OpenVINO CPU compiled model tuned for small-batch latency (LATENCY hint, one stream, ``threads``
    unpinned inference threads) with one reusable infer request. Non-quantized layers run in f32, as
    ONNX Runtime's do: the CPU plugin's default on bf16-capable CPUs is bf16, which would change the logits
    of fp32 files; int8 QDQ files still run int8 kernels. The batch dimension stays dynamic.

    Example: ``logits = OpenVinoModel(Path("model.int8.onnx"), threads=1)(images)``.
    """

    engine = "openvino"

    def __init__(self, path: Path, threads: int = 1) -> None:
        core = _openvino_core()  # before the checks of the base class: a missing package is named first
        super().__init__(path, threads)
        model = core.read_model(str(self.path))
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": "f32",
            # Unpinned, like ONNX Runtime's explicitly sized pool: a thread pinned to a core that another
            # process is using waits instead of moving.
            "ENABLE_CPU_PINNING": False,
        }
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)

    @property
    def num_outputs(self) -> int | None:
        size = self._output.get_partial_shape()[-1]
        return size.get_length() if size.is_static else None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        # share_inputs avoids a copy of the input; share_outputs=False copies the output out of the
        # request's buffer, which the next call overwrites.
        result = self.request.infer([as_array(images)], share_inputs=True, share_outputs=False)
        return result[self._output]


_MODELS: dict[str, type[EngineModel]] = {"onnxruntime": OrtModel, "openvino": OpenVinoModel}


def open_model(path: Path, engine: str = "onnxruntime", threads: int = 1) -> EngineModel:
    """Load the ONNX file ``path`` into ``engine`` (one of ``ENGINES``) with ``threads`` inference threads.

    Example: ``open_model(Path("gate.onnx"), engine="openvino")(images)``.
    """
    _check_engine(engine)
    return _MODELS[engine](Path(path), threads)
