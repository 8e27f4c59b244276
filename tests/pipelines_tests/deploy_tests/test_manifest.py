"""pipelines.deploy.manifest: the sealed, typed manifest; tampered or malformed bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.deploy.manifest import Manifest, read_manifest
from pipelines.deploy.runtime import load_bundle
from pipelines.errors import UntrustedFileError


def test_tampered_file_is_refused(int8_bundle, tmp_path: Path) -> None:
    _, folder, _ = int8_bundle
    copy = shutil.copytree(folder, tmp_path / "bundle")
    target = copy / "expert_1.int8.onnx"
    content = bytearray(target.read_bytes())
    content[-10] ^= 0xFF
    target.write_bytes(bytes(content))
    with pytest.raises(UntrustedFileError, match=r"expert_1\.int8\.onnx"):
        load_bundle(copy)
    assert load_bundle(copy, precision="fp32").precision == "fp32"  # only the files it loads are checked


@pytest.mark.parametrize(
    "manifest_text",
    [None, "{not json", json.dumps([1, 2]), json.dumps({"format_version": 3, "kind": "hycomp-moe"})],
    ids=["missing", "not-json", "not-object", "incomplete"],
)
def test_missing_or_malformed_manifest_is_refused(
    int8_bundle, tmp_path: Path, manifest_text: str | None
) -> None:
    copy = shutil.copytree(int8_bundle[1], tmp_path / "bundle")
    if manifest_text is None:
        (copy / "manifest.json").unlink()
    else:
        (copy / "manifest.json").write_text(manifest_text)
    with pytest.raises(UntrustedFileError, match="manifest"):
        load_bundle(copy)


def _edit(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of the bundle in ``folder`` whose manifest.json was edited by ``change(dict)``."""
    copy = shutil.copytree(folder, tmp_path / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.update(top_k=1),
        lambda m: m.update(views=2),
        lambda m: m.update(class_names=["a", "b", "c", "d"]),
        lambda m: m.update(mean=[0.0, 0.0, 0.0]),
        lambda m: m["metadata"].update(trial=8),
    ],
    ids=["top_k", "views", "class_names", "mean", "metadata"],
)
def test_an_edited_manifest_is_refused(int8_bundle, tmp_path: Path, change) -> None:
    copy = _edit(int8_bundle[1], tmp_path, change)
    with pytest.raises(UntrustedFileError, match=r"was modified.*Re-run `hycomp export`"):
        load_bundle(copy)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.pop("top_k"), "top_k '<missing>'"),
        (lambda m: m.update(num_experts="3"), "num_experts '3'"),
        (lambda m: m.update(views=5), "views 5"),
        (lambda m: m.update(input_shape=[3, 28]), "input_shape"),
        (lambda m: m.update(files=["gate.onnx"]), "files"),
        (lambda m: m.update(precision="int4"), "precision 'int4'"),
        (lambda m: m.update(mean="0.5"), "mean '0.5'"),
        (lambda m: m.update(top_k=True), "top_k True"),
        (lambda m: m.update(single_file="other.onnx"), "single_file 'other.onnx'"),
    ],
    ids=["missing", "string", "views", "shape", "files", "precision", "mean", "bool", "single_file"],
)
def test_missing_or_mistyped_fields_are_named(int8_bundle, tmp_path: Path, change, field: str) -> None:
    copy = _edit(int8_bundle[1], tmp_path, change)
    with pytest.raises(UntrustedFileError, match="malformed") as raised:
        load_bundle(copy)
    assert field in str(raised.value) and "hycomp export" in str(raised.value)


def test_a_bundle_of_another_format_version_says_to_re_export(int8_bundle, tmp_path: Path) -> None:
    for old in (1, 2):  # 2: the per-expert bundles written before model.onnx
        copy = _edit(int8_bundle[1], tmp_path / str(old), lambda m, old=old: m.update(format_version=old))
        with pytest.raises(UntrustedFileError, match=rf"format_version {old} .*Re-run `hycomp export`"):
            load_bundle(copy)


def test_read_manifest_gives_a_typed_record(int8_bundle) -> None:
    manifest = read_manifest(int8_bundle[1])
    assert isinstance(manifest, Manifest)
    assert manifest == int8_bundle[2]
    assert manifest.input_shape == (3, 28, 28) and manifest.metadata == {"trial": 7}
