"""Save and load models without pickling code.

A pruned model's architecture differs from its builder's (ModelSpeedup shrinks layers, depth reduction
replaces residual blocks by :class:`~pipelines.compress.depth.RemovedBlock`), so a checkpoint
is three files: a description (the model's :class:`~pipelines.models.ModelSpec` and the dataset shape it
was built for, :func:`describe_model`) plus the shape of every Conv2d / Linear / BatchNorm2d and every removed block (``*.json``),
the state_dict (``*.pt``, loaded with ``torch.load(weights_only=True)``), and the state_dict's SHA-256
recorded in the json. A file that does not match its recorded hash, or was written in another format
version, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipelines.compress.depth import RemovedBlock
from pipelines.errors import UntrustedFileError
from pipelines.files import sha256_file
from pipelines.models import ModelSpec

__all__ = [
    "FORMAT_VERSION",
    "describe_layers",
    "describe_model",
    "resize_layers",
    "rebuild_model",
    "build_described",
    "save_checkpoint",
    "load_checkpoint",
]

FORMAT_VERSION = 2  # 2: the description holds a ModelSpec (any model family), not a registry name
# Removed blocks (``RemovedBlock`` entries) need no new version: a checkpoint without them is what version 2
# always was, and a reader that predates them refuses one with them, naming the layer type.


def describe_layers(model: nn.Module) -> dict[str, dict]:
    """Constructor arguments of every layer whose shape pruning can change (Conv2d, Linear, BatchNorm,
    InstanceNorm, GroupNorm, PReLU), and every removed residual block (``RemovedBlock``), by qualified name.
    A parent comes before its children (``named_modules`` order), so a removed block's place is set first."""
    layers: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, RemovedBlock):
            layers[name] = {"type": "RemovedBlock"}
        elif isinstance(module, nn.Conv2d):
            layers[name] = {
                "type": "Conv2d",
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size),
                "stride": list(module.stride),
                "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
                "groups": module.groups,
                "bias": module.bias is not None,
            }
        elif isinstance(module, nn.Linear):
            layers[name] = {
                "type": "Linear",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
            }
        elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d | nn.InstanceNorm2d):
            layers[name] = {
                "type": type(module).__name__,
                "num_features": module.num_features,
                "eps": module.eps,
                "momentum": module.momentum,
                "affine": module.affine,
                "track_running_stats": module.track_running_stats,
            }
        elif isinstance(module, nn.GroupNorm):
            layers[name] = {
                "type": "GroupNorm",
                "num_groups": module.num_groups,
                "num_channels": module.num_channels,
                "eps": module.eps,
                "affine": module.affine,
            }
        elif isinstance(module, nn.PReLU):
            layers[name] = {"type": "PReLU", "num_parameters": module.num_parameters}
    return layers


_NORMS = {"BatchNorm2d": nn.BatchNorm2d, "BatchNorm1d": nn.BatchNorm1d, "InstanceNorm2d": nn.InstanceNorm2d}


def _make_layer(spec: dict) -> nn.Module:
    kind = spec["type"]
    if kind == "Conv2d":
        return nn.Conv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            tuple(spec["stride"]),
            tuple(spec["padding"]) if isinstance(spec["padding"], list) else spec["padding"],
            groups=spec["groups"],
            bias=spec["bias"],
        )
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind in _NORMS:
        return _NORMS[kind](
            spec["num_features"],
            eps=spec["eps"],
            momentum=spec["momentum"],
            affine=spec["affine"],
            track_running_stats=spec["track_running_stats"],
        )
    if kind == "GroupNorm":
        return nn.GroupNorm(spec["num_groups"], spec["num_channels"], eps=spec["eps"], affine=spec["affine"])
    if kind == "PReLU":
        return nn.PReLU(spec["num_parameters"])
    if kind == "RemovedBlock":
        return RemovedBlock()
    raise UntrustedFileError(f"layer type {kind!r} in an architecture description is not supported.")


def resize_layers(model: nn.Module, layers: dict[str, dict]) -> nn.Module:
    """Replace layers of a freshly built ``model`` with the shapes recorded by :func:`describe_layers`."""
    for name, spec in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not hasattr(parent, child):
            raise UntrustedFileError(f"architecture description names layer {name!r}, which the model lacks.")
        setattr(parent, child, _make_layer(spec))
    return model


def describe_model(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> dict:
    """What :func:`rebuild_model` needs besides the layer shapes and weights (JSON-able)."""
    return {
        "kind": "model",
        "model": spec.to_dict(),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
    }


def build_described(description: dict) -> nn.Module:
    """The unpruned architecture of a :func:`describe_model` description (untrained; the spec's own
    checkpoint file is not read: the saved weights replace it)."""
    try:
        spec = ModelSpec.from_dict(description["model"])
        shape = (description["in_channels"], description["num_classes"], description["image_size"])
    except (KeyError, TypeError) as error:
        raise UntrustedFileError(f"a checkpoint's model description lacks {error}; re-create it.") from error
    return spec.build(*shape, with_checkpoint=False)


def rebuild_model(description: dict, layers: dict[str, dict], state: dict[str, torch.Tensor]) -> nn.Module:
    """A (pruned) model from a checkpoint: ``rebuild_model(*load_checkpoint(path))``; in eval mode."""
    model = resize_layers(build_described(description), layers)
    model.load_state_dict(state)
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | Path, description: dict) -> None:
    """Write ``path.pt`` (state_dict) and ``path.json`` (``description`` + layer shapes + hash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".pt")
    torch.save(model.state_dict(), weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "description": description,
        "layers": describe_layers(model),
        "sha256": sha256_file(weights),
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Read a checkpoint written by :func:`save_checkpoint`: (description, layers, state_dict).

    The state_dict is loaded with ``weights_only=True`` after its SHA-256 matched the recorded one.
    """
    path = Path(path)
    weights, meta_path = path.with_suffix(".pt"), path.with_suffix(".json")
    for file in (weights, meta_path):
        if not file.exists():
            raise UntrustedFileError(
                f"checkpoint file missing: {file}. Re-create it (re-run the command that wrote it)."
            )
    try:
        meta = json.loads(meta_path.read_text())
        recorded = meta["sha256"]
        version = meta.get("format_version")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UntrustedFileError(f"{meta_path} is not a hycomp checkpoint description ({error}).") from error
    if version != FORMAT_VERSION:
        raise UntrustedFileError(
            f"{meta_path} is a checkpoint of format version {version}; this hycomp reads version "
            f"{FORMAT_VERSION}. Delete it and re-run the command that wrote it (a cached teacher is "
            "retrained, a trial re-run)."
        )
    actual = sha256_file(weights)
    if actual != recorded:
        raise UntrustedFileError(
            f"{weights} was modified: sha256 {actual[:12]}… does not match the recorded {recorded[:12]}…. "
            "Refusing to load it; delete the file and re-create it."
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError for anything but plain tensors
        raise UntrustedFileError(f"{weights} is not a plain tensor file ({error}).") from error
    return meta["description"], meta["layers"], state
