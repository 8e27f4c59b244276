"""A bundle's ``manifest.json`` as a typed, frozen record: parsed and checked in one place, and sealed with
a digest of its own content, so an edited manifest (another top_k, other classes) is refused instead of
silently changing predictions. Torch-free."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import UntrustedFileError
from pipelines.files import sha256_file, sha256_json
from pipelines.symmetry import VIEWS

__all__ = [
    "BUNDLE_KIND",
    "FORMAT_VERSION",
    "PRECISIONS",
    "SINGLE_FILE",
    "Manifest",
    "LAYOUTS",
    "file_names",
    "trunk_file_name",
    "read_manifest",
    "verified",
]

# 2: typed fields and a digest of the manifest's own content (``manifest_sha256``);
# 3: ``single_file``, the whole MoE as one ONNX file (pipelines.deploy.single_file)
FORMAT_VERSION = 3
BUNDLE_KIND = "hycomp-moe"
PRECISIONS = ("fp32", "int8")
LAYOUTS = (
    "separate",
    "shared",
)  # pipelines.moe.LAYOUTS: experts on the image, or on a shared trunk's features
_RE_EXPORT = "Re-run `hycomp export` (or deploy_moe) to write it again."


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds and how to run it. ``metadata`` keeps extra JSON values a caller attached."""

    top_k: int
    num_experts: int
    views: int
    input_shape: tuple[int, int, int]  # channels, height, width of one input
    files: dict[str, str]  # file name -> sha256
    precision: str  # fp32 | int8
    single_file: str  # the whole MoE (views, gate, routing, experts) at ``precision`` as one ONNX file
    calibration: dict[str, int] = field(default_factory=dict)  # int8 file -> calibration images it saw
    weight_grid: dict[str, dict[str, int]] = field(default_factory=dict)  # int8 file -> exact/rounded counts
    dataset: str | None = None
    class_names: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None  # per-channel normalization of pixels / 255
    std: tuple[float, ...] | None = None
    params: dict = field(default_factory=dict)  # the search parameters of the model
    metadata: dict = field(default_factory=dict)
    layout: str = "separate"  # shared: trunk.onnx runs first; the gate and experts read its feature map
    format_version: int = FORMAT_VERSION
    kind: str = BUNDLE_KIND

    def to_dict(self) -> dict:
        """JSON-able content (tuples as lists), sealed with ``manifest_sha256``."""
        content = json.loads(json.dumps(dataclasses.asdict(self)))
        return {**content, "manifest_sha256": sha256_json(content)}

    def write(self, folder: Path) -> None:
        (Path(folder) / "manifest.json").write_text(json.dumps(self.to_dict(), indent=2))


def file_names(num_experts: int, precision: str) -> tuple[str, list[str]]:
    """(gate file, expert files) of a bundle at ``precision``."""
    suffix = ".int8.onnx" if precision == "int8" else ".onnx"
    return f"gate{suffix}", [f"expert_{index}{suffix}" for index in range(num_experts)]


def trunk_file_name(precision: str) -> str:
    """The trunk file of a shared-layout bundle at ``precision``."""
    return "trunk.int8.onnx" if precision == "int8" else "trunk.onnx"


SINGLE_FILE = "model.onnx"


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _problems(raw: dict) -> list[str]:
    """Every field of ``raw`` that is missing or of the wrong type, as 'field value (expected ...)'."""
    checks: dict[str, tuple[bool, str]] = {
        "top_k": (_is_int(raw.get("top_k")), "a positive integer"),
        "num_experts": (_is_int(raw.get("num_experts")), "a positive integer"),
        "views": (raw.get("views") in VIEWS and _is_int(raw.get("views")), f"one of {list(VIEWS)}"),
        "input_shape": (
            isinstance(raw.get("input_shape"), list)
            and len(raw["input_shape"]) == 3
            and all(_is_int(size) for size in raw["input_shape"]),
            "[channels, height, width]",
        ),
        "files": (
            isinstance(raw.get("files"), dict)
            and all(isinstance(key, str) and isinstance(value, str) for key, value in raw["files"].items()),
            "an object of file name -> sha256",
        ),
        "precision": (raw.get("precision") in PRECISIONS, f"one of {list(PRECISIONS)}"),
        "single_file": (
            isinstance(raw.get("single_file"), str) and raw["single_file"] in (raw.get("files") or {}),
            "the name of a file listed in files",
        ),
        "calibration": (isinstance(raw.get("calibration", {}), dict), "an object"),
        "weight_grid": (isinstance(raw.get("weight_grid", {}), dict), "an object"),
        "dataset": (raw.get("dataset") is None or isinstance(raw.get("dataset"), str), "a name"),
        "class_names": (
            raw.get("class_names") is None
            or (
                isinstance(raw["class_names"], list)
                and all(isinstance(name, str) for name in raw["class_names"])
            ),
            "a list of names",
        ),
        "params": (isinstance(raw.get("params", {}), dict), "an object"),
        "layout": (raw.get("layout", "separate") in LAYOUTS, f"one of {list(LAYOUTS)}"),
        "metadata": (isinstance(raw.get("metadata", {}), dict), "an object"),
    }
    for key in ("mean", "std"):
        value = raw.get(key)
        checks[key] = (
            value is None or (isinstance(value, list) and bool(value) and all(_is_number(v) for v in value)),
            "a list of numbers, one per channel",
        )
    problems = [
        f"{key} {raw.get(key, '<missing>')!r} (expected {expected})"
        for key, (ok, expected) in checks.items()
        if not ok
    ]
    if not problems and _is_int(raw["top_k"]) and raw["top_k"] > raw["num_experts"]:
        problems.append(f"top_k {raw['top_k']} (expected at most num_experts {raw['num_experts']})")
    shape = raw.get("input_shape")
    if not problems and raw.get("std") is not None and any(v <= 0 for v in raw["std"]):
        problems.append(f"std {raw['std']!r} (expected positive numbers)")
    for key in ("mean", "std"):
        if not problems and raw.get(key) is not None and len(raw[key]) != shape[0]:
            problems.append(f"{key} {raw[key]!r} (expected {shape[0]} values, one per input channel)")
    return problems


def read_manifest(folder: Path) -> Manifest:
    """The checked manifest of the bundle in ``folder``; UntrustedFileError naming the field otherwise."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UntrustedFileError(
            f"{path} is missing; {folder} is not a hycomp bundle (write one with deploy_moe)."
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UntrustedFileError(
            f"{path} is not valid JSON ({error}); the file is cut short or damaged. {_RE_EXPORT}"
        ) from None
    if not isinstance(raw, dict):
        raise UntrustedFileError(f"{path} is malformed: expected a JSON object. {_RE_EXPORT}")
    if raw.get("kind") != BUNDLE_KIND:
        raise UntrustedFileError(
            f"{path}: kind {raw.get('kind')!r} is not {BUNDLE_KIND!r}; not a hycomp bundle."
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise UntrustedFileError(
            f"{path}: format_version {raw.get('format_version')!r} was written by another hycomp version "
            f"(this one reads {FORMAT_VERSION}). {_RE_EXPORT}"
        )
    problems = _problems(raw)
    if problems:
        raise UntrustedFileError(f"{path} is malformed: {'; '.join(problems)}. {_RE_EXPORT}")
    sealed = raw.pop("manifest_sha256", None)
    if sealed != sha256_json(raw):
        raise UntrustedFileError(
            f"{path} was modified after it was written (its manifest_sha256 does not match its content). "
            f"Refusing to run it: an edited manifest changes predictions silently. {_RE_EXPORT}"
        )
    known = {item.name for item in dataclasses.fields(Manifest)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UntrustedFileError(f"{path} has unknown fields {unknown}. {_RE_EXPORT}")
    for key in ("input_shape", "class_names", "mean", "std"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    return Manifest(**raw)


def verified(folder: Path, name: str, manifest: Manifest) -> Path:
    """``folder / name`` after checking it against the manifest's sha256 (UntrustedFileError otherwise)."""
    path = Path(folder) / name
    if name not in manifest.files:
        raise UntrustedFileError(f"{Path(folder) / 'manifest.json'} lists no hash for {name}. {_RE_EXPORT}")
    if not path.is_file():
        raise UntrustedFileError(f"{path} listed in the manifest is missing. {_RE_EXPORT}")
    actual = sha256_file(path)
    if actual != manifest.files[name]:
        raise UntrustedFileError(
            f"{path} was modified: sha256 {actual[:12]}… does not match the manifest's "
            f"{manifest.files[name][:12]}…. Refusing to load it. {_RE_EXPORT}"
        )
    return path
