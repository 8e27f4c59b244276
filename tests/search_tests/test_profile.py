"""``hycomp profile`` and ``measure.latency: predicted``: bad input exits 2 with the fix, a model is
profiled into the table it names, and the config refuses an unknown latency source."""

from __future__ import annotations

import onnx
import pytest

from pipelines.deploy.kernel_profile import kernel_model
from pipelines.deploy.latency_table import Kernel, load_table
from pipelines.errors import ConfigError
from search.cli import main
from search.config import parse_config


def test_profile_of_a_missing_model_exits_2(tmp_path, capsys):
    assert main(["profile", str(tmp_path / "absent.onnx"), "--profile", str(tmp_path / "t.json")]) == 2
    error = capsys.readouterr().err
    assert "absent.onnx" in error and "bundle" in error
    assert not (tmp_path / "t.json").exists()


def test_profile_of_a_foreign_table_exits_2(tmp_path, capsys):
    table = load_table(tmp_path / "t.json")
    table.cpu = "Some other CPU"
    table.save()
    model = tmp_path / "k.onnx"
    onnx.save(kernel_model(Kernel("add", "int8", (4, 8, 8))), str(model))
    assert main(["profile", str(model), "--profile", str(tmp_path / "t.json")]) == 2
    assert "Some other CPU" in capsys.readouterr().err
    assert main(["profile", str(model), "--profile", str(tmp_path / "t.json"), "--any-cpu"]) == 0
    assert "predicted" in capsys.readouterr().out


def test_profile_fills_the_table(tmp_path, capsys):
    model = tmp_path / "k.onnx"
    onnx.save(kernel_model(Kernel("conv", "int8", (4, 8, 8), out_channels=4, kernel=3, pads=1)), str(model))
    table = tmp_path / "t.json"
    assert main(["profile", str(model), "--profile", str(table), "--repeats", "3"]) == 0
    assert len(load_table(table).kernels) == 3  # quantize, conv, dequantize
    assert "predicted" in capsys.readouterr().out


def test_measure_latency_source_is_checked():
    assert parse_config({"measure": {"latency": "predicted"}}).measure.latency == "predicted"
    with pytest.raises(ConfigError, match="measure.latency"):
        parse_config({"measure": {"latency": "guessed"}})
    with pytest.raises(ConfigError, match="measure.profile"):
        parse_config({"measure": {"profile_any_cpu": True}})


def test_profile_of_a_study_folder_times_what_the_bundles_run(tmp_path, capsys):
    """A folder of bundles is profiled as the predictor models each bundle: its expert at every batch its
    test-time views give (here 1 and 2), never the one-file model.onnx (whose view shapes are dynamic)."""
    import torch

    from pipelines.deploy.bundle import deploy_moe
    from pipelines.models import build_model
    from pipelines.moe import MoEConfig, build_moe

    torch.manual_seed(0)
    moe = build_moe(build_model("resnet8", 3, 4, 0.25), 3, MoEConfig(1, 1, 4, views=2), 0)
    bundle = tmp_path / "study" / "trials" / "trial_0" / "bundle"
    deploy_moe(moe, bundle, torch.randn(8, 3, 16, 16), int8=False)
    assert (bundle / "model.onnx").exists()
    table = tmp_path / "t.json"
    assert main(["profile", str(tmp_path / "study"), "--profile", str(table), "--repeats", "3"]) == 0
    batches = {key.rsplit("|b=", 1)[1] for key in load_table(table).kernels}
    assert batches == {"1", "2"}
    assert f"{bundle}\tpredicted" in capsys.readouterr().out
