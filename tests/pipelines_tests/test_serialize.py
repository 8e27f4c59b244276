"""pipelines.serialize: a pruned model round-trips through json + state_dict; tampered files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.compress.prune import PruneConfig, prune
from pipelines.errors import UntrustedFileError
from pipelines.files import sha256_file
from pipelines.models import ModelSpec, build_model
from pipelines.serialize import (
    FORMAT_VERSION,
    describe_layers,
    describe_model,
    load_checkpoint,
    rebuild_model,
    resize_layers,
    save_checkpoint,
)

DESCRIPTION = describe_model(ModelSpec("resnet8", width=0.5), 3, 8, 28)


class NotATensor:
    """Anything but tensors must be refused by a weights_only load."""


@pytest.fixture(scope="module")
def pruned_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 8, 0.5)
    example = torch.randn(2, 3, 28, 28)
    pruned = prune(model, PruneConfig(sparsity=0.5, pruner="l1", channel_multiple=1), example).model
    # Non-trivial BatchNorm statistics, so that the round trip must carry buffers too.
    pruned.train()
    with torch.no_grad():
        pruned(torch.randn(16, 3, 28, 28))
    return pruned.eval()


def _rebuild(path: Path) -> torch.nn.Module:
    return rebuild_model(*load_checkpoint(path))  # strict load: every key and shape must match


def test_pruned_model_round_trips_exactly(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "ckpt" / "model", DESCRIPTION)
    assert (tmp_path / "ckpt" / "model.pt").exists() and (tmp_path / "ckpt" / "model.json").exists()
    rebuilt = _rebuild(tmp_path / "ckpt" / "model")
    example = torch.randn(5, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(example), pruned_model(example))
    assert describe_layers(rebuilt) == describe_layers(pruned_model)


def test_description_and_hash_are_recorded(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["description"] == DESCRIPTION
    assert meta["sha256"] == sha256_file(tmp_path / "model.pt")
    assert meta["format_version"] == FORMAT_VERSION
    assert ModelSpec.from_dict(meta["description"]["model"]) == ModelSpec("resnet8", width=0.5)
    # The pruned shapes are recorded, not the builder's: conv1 of resnet8 at width 0.5 has 8 channels.
    assert meta["layers"]["conv1"]["out_channels"] == pruned_model.conv1.out_channels < 8


def test_resize_layers_without_description_cannot_load(pruned_model: torch.nn.Module) -> None:
    fresh = build_model("resnet8", 3, 8, 0.5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(pruned_model.state_dict())


def test_describe_layers_records_constructor_arguments() -> None:
    layers = describe_layers(build_model("resnet8", 1, 5, 0.5))
    assert layers["conv1"] == {
        "type": "Conv2d",
        "in_channels": 1,
        "out_channels": 8,
        "kernel_size": [3, 3],
        "stride": [1, 1],
        "padding": [1, 1],
        "groups": 1,
        "bias": False,
    }
    assert layers["fc"] == {"type": "Linear", "in_features": 32, "out_features": 5, "bias": True}
    assert layers["bn1"] == {
        "type": "BatchNorm2d",
        "num_features": 8,
        "eps": 1e-5,
        "momentum": 0.1,
        "affine": True,
        "track_running_stats": True,
    }


def test_resize_layers_refuses_unknown_layers() -> None:
    model = build_model("resnet8", 3, 8, 0.5)
    with pytest.raises(UntrustedFileError, match="nonexistent"):
        resize_layers(
            model, {"nonexistent": {"type": "Linear", "in_features": 2, "out_features": 2, "bias": True}}
        )
    with pytest.raises(UntrustedFileError, match="not supported"):
        resize_layers(model, {"fc": {"type": "Exec", "code": "print(1)"}})


def test_tampered_weights_are_refused(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    weights = tmp_path / "model.pt"
    payload = bytearray(weights.read_bytes())
    payload[-100] ^= 0xFF
    weights.write_bytes(bytes(payload))
    with pytest.raises(UntrustedFileError, match="modified"):
        load_checkpoint(tmp_path / "model")


def test_swapped_state_dict_is_refused(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    torch.save(
        {key: torch.zeros_like(value) for key, value in pruned_model.state_dict().items()},
        tmp_path / "model.pt",
    )
    with pytest.raises(UntrustedFileError, match="does not match"):
        load_checkpoint(tmp_path / "model")


def test_pickled_objects_are_refused_even_with_matching_hash(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, weights)
    meta = {"format_version": FORMAT_VERSION, "description": {}, "layers": {}, "sha256": sha256_file(weights)}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UntrustedFileError, match="not a plain tensor file"):
        load_checkpoint(tmp_path / "model")


def test_loads_with_weights_only(
    tmp_path: Path, pruned_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _, _, state = load_checkpoint(tmp_path / "model")
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)
    assert set(state) == set(pruned_model.state_dict())


@pytest.mark.parametrize("missing", ["model.pt", "model.json"])
def test_missing_files_are_refused(tmp_path: Path, pruned_model: torch.nn.Module, missing: str) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    (tmp_path / missing).unlink()
    with pytest.raises(UntrustedFileError, match=missing):
        load_checkpoint(tmp_path / "model")


def test_json_without_hash_is_refused(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    (tmp_path / "model.json").write_text(json.dumps({"description": DESCRIPTION}))
    with pytest.raises(UntrustedFileError, match="not a hycomp checkpoint"):
        load_checkpoint(tmp_path / "model")


def test_checkpoint_of_an_older_format_names_the_fix(tmp_path: Path, pruned_model: torch.nn.Module) -> None:
    save_checkpoint(pruned_model, tmp_path / "model", DESCRIPTION)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["format_version"] = 1  # a registry name + width, before ModelSpec descriptions
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UntrustedFileError, match="format version 1.*re-run the command"):
        load_checkpoint(tmp_path / "model")


def test_pruned_norm_layers_of_a_user_model_round_trip(tmp_path: Path) -> None:
    """GroupNorm, InstanceNorm and PReLU shrink with the convs before them; the checkpoint records them."""
    from pipelines.compress.prune import PruneConfig, prune

    spec = ModelSpec("tests.pipelines_tests.user_model:NormsNet")
    torch.manual_seed(0)
    model = spec.build(3, 4, 16).eval()
    example = torch.randn(2, 3, 16, 16)
    pruned = prune(model, PruneConfig(sparsity=0.5, channel_multiple=1), example).model
    assert pruned.norm.num_channels == pruned.conv1.out_channels < 16
    save_checkpoint(pruned, tmp_path / "model", describe_model(spec, 3, 4, 16))
    rebuilt = _rebuild(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(rebuilt(example), pruned(example))
