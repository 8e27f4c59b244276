"""hycomp predict: an exported bundle runs on ONNX Runtime alone (torch never imported), and bad inputs or
untrusted bundles stop with exit code 2 and a message naming the file or field, the value and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.deploy.bundle import deploy_moe
from pipelines.models import build_model
from pipelines.moe import MoEConfig, build_moe
from search.cli import main

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["left", "middle", "right"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    moe = build_moe(build_model("resnet8", 3, 3, width=0.25), 3, MoEConfig(num_experts=2, gate_size=4))
    folder = tmp_path_factory.mktemp("export") / "bundle"
    extra = {"dataset": "toy", "class_names": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3}
    deploy_moe(moe.eval(), folder, torch.rand(8, 3, 28, 28), int8=False, extra_manifest=extra)
    return folder


def _npz(path: Path, images: np.ndarray, labels: bool = True) -> Path:
    arrays = {"test_images": images}
    if labels:
        arrays["test_labels"] = np.arange(len(images)).reshape(-1, 1) % 3
    np.savez(path, **arrays)
    return path


def _rgb(count: int = 4, size: int = 28) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_predict_runs_without_torch(bundle: Path, tmp_path: Path, engine: str) -> None:
    data = _npz(tmp_path / "images.npz", _rgb())
    code = (
        "import sys\nfrom search.cli import main\n"
        f"code = main(['predict', {str(bundle)!r}, {str(data)!r}, '--engine', {engine!r}])\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH', code)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "NO_TORCH 0" in completed.stdout
    assert "accuracy" in completed.stdout and any(name in completed.stdout for name in CLASSES)


def _refused(capsys: pytest.CaptureFixture, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def test_inputs_that_are_not_images_are_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(_npz(tmp_path / "whole.npz", _rgb()).read_bytes()[:300])
    fake_png = tmp_path / "photo.png"
    fake_png.write_bytes(b"\x00\x01 not a png")
    no_images = tmp_path / "other.npz"
    np.savez(no_images, weights=np.zeros(3))
    empty = _npz(tmp_path / "empty.npz", np.zeros((0, 28, 28, 3), dtype=np.uint8))
    for path, words in (
        (text, ("not a readable .npz", ".npz")),
        (truncated, ("not a readable .npz",)),
        (fake_png, ("not a readable image", "PNG/JPEG")),
        (no_images, ("neither test_images nor images", "weights")),
        (empty, ("non-empty",)),
        (tmp_path, ("is a folder",)),
        (tmp_path / "missing.npz", ("does not exist",)),
    ):
        _refused(capsys, ["predict", str(bundle), str(path)], str(path), *words)


def test_images_that_do_not_fit_the_model_are_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    grey = _npz(tmp_path / "grey.npz", _rgb()[..., 0])
    _refused(capsys, ["predict", str(bundle), str(grey)], "1 channel(s) (grey)", "takes 3 (RGB)", "convert")
    small = _npz(tmp_path / "small.npz", _rgb(size=14))
    _refused(capsys, ["predict", str(bundle), str(small)], "14x14", "28x28", "Resize")
    floats = _npz(tmp_path / "floats.npz", _rgb().astype(np.float32) / 255)
    _refused(capsys, ["predict", str(bundle), str(floats)], "float32", "uint8")


def test_an_rgb_image_given_to_a_grey_model_is_refused(tmp_path: Path, capsys) -> None:
    moe = build_moe(build_model("resnet8", 1, 3, width=0.25), 1, MoEConfig(num_experts=1))
    folder = tmp_path / "grey_bundle"
    extra = {"class_names": CLASSES, "mean": [0.5], "std": [0.25]}
    deploy_moe(moe.eval(), folder, torch.rand(4, 1, 28, 28), int8=False, extra_manifest=extra)
    rgb = _npz(tmp_path / "rgb.npz", _rgb())
    _refused(capsys, ["predict", str(folder), str(rgb)], "3 channel(s) (RGB)", "takes 1 (grey)")
    assert main(["predict", str(folder), str(_npz(tmp_path / "g.npz", _rgb()[..., :1]))]) == 0


def _edited(bundle: Path, tmp_path: Path, edit) -> Path:
    copy = shutil.copytree(bundle, tmp_path / "edited")
    path = copy / "manifest.json"
    text = path.read_text()
    path.write_text(edit(text))
    return copy


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "mean"}), "was modified"),
        (lambda text: json.dumps({**json.loads(text), "top_k": 2}), "was modified"),
        (lambda text: json.dumps({**json.loads(text), "std": "wide"}), "std 'wide'"),
        (lambda text: json.dumps({**json.loads(text), "class_names": [1, 2, 3]}), "class_names"),
        (lambda text: json.dumps({**json.loads(text), "format_version": 1}), "format_version 1"),
    ],
    ids=["cut-short", "field-removed", "top_k-edited", "wrong-type", "names-not-strings", "old-format"],
)
def test_untrusted_bundles_are_refused(bundle: Path, tmp_path: Path, capsys, edit, expected: str) -> None:
    data = _npz(tmp_path / "images.npz", _rgb())
    copy = _edited(bundle, tmp_path, edit)
    _refused(capsys, ["predict", str(copy), str(data)], "manifest.json", expected, "hycomp export")


def test_predict_on_openvino_gives_the_onnxruntime_classes(bundle: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("openvino")
    data = _npz(tmp_path / "images.npz", _rgb(8))
    assert main(["predict", str(bundle), str(data)]) == 0
    onnxruntime_output = capsys.readouterr().out
    assert main(["predict", str(bundle), str(data), "--engine", "openvino"]) == 0
    assert capsys.readouterr().out == onnxruntime_output


def test_an_unknown_engine_is_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    data = _npz(tmp_path / "images.npz", _rgb())
    _refused(
        capsys,
        ["predict", str(bundle), str(data), "--engine", "tensorrt"],
        "engine",
        "'tensorrt'",
        "onnxruntime, openvino",
    )
