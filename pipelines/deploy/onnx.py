"""torch -> ONNX export of one module (a plain CNN, a gate or an expert) with a dynamic batch dimension."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import CompressionError, DataError

__all__ = ["OPSET", "export_onnx"]

OPSET = 17


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
        # The TorchScript exporter (dynamo=False) folds BatchNorm into the convs and emits opset 17; the
        # torch.export-based default is slower, chatty and cannot emit 17. Its deprecation notice is
        # silenced; tracer warnings (data-dependent control flow) still show: the export may be wrong.
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
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as error:
        raise CompressionError(
            f"ONNX export of {type(module).__name__} failed ({type(error).__name__}: {str(error)[:300]}). "
            "An operator of the model has no ONNX opset-17 form: replace it, or exclude the model."
        ) from error
    finally:
        module.train(was_training)
    return path
