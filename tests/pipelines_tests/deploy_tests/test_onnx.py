"""pipelines.deploy.onnx: torch -> ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel
from tests.pipelines_tests.deploy_tests.support import NUM_CLASSES


def test_export_matches_torch_at_any_batch_size(classifier: nn.Module, data, tmp_path: Path) -> None:
    images, _ = data
    classifier.train()  # export must use eval mode and leave the mode as it was
    path = export_onnx(classifier, images[:2], tmp_path / "model.onnx")
    assert classifier.training
    classifier.eval()
    graph = onnx.load(str(path)).graph
    assert [node.name for node in graph.input] == ["input"] and [node.name for node in graph.output] == [
        "output"
    ]
    model = OrtModel(path, threads=2)
    assert model.precision == "fp32" and model.num_outputs == NUM_CLASSES
    for batch in (1, 5, 128):
        with torch.no_grad():
            expected = classifier(images[:batch]).numpy()
        actual = model(images[:batch].numpy())
        assert actual.shape == (batch, NUM_CLASSES)
        assert np.abs(actual - expected).max() < 1e-4
