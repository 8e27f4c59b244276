"""Run an exported bundle on new images with a CPU inference engine (ONNX Runtime or OpenVINO) and numpy alone (no torch, no NNI, no training
code): read .npz or image files, check they fit the model, normalize as the manifest says, classify."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipelines.deploy.engines import ENGINES
from pipelines.deploy.manifest import Manifest, read_manifest
from pipelines.deploy.runtime import load_bundle
from pipelines.errors import ConfigError, DataError, unknown_name

__all__ = ["predict_files", "read_images"]

_FORMATS = "a MedMNIST-style .npz (test_images/test_labels, or images/labels) or PNG/JPEG image files"


def _bundle_folder(path: Path) -> Path:
    for candidate in (path, path / "bundle"):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise ConfigError(
        f"bundle: {path} holds no manifest.json. Pass an export's bundle/ folder "
        "(results/<study>/export/trial_<n>/bundle)."
    )


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = f"{split}_images" if f"{split}_images" in npz.files else "images"
            if key not in npz.files:
                raise DataError(
                    f"input: {path} has neither {split}_images nor images arrays (it has "
                    f"{', '.join(npz.files) or 'no arrays'}). Save the images under one of those names."
                )
            images = npz[key]
            label_key = key.replace("images", "labels")
            labels = np.asarray(npz[label_key]).reshape(-1) if label_key in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(
            f"input: {path} is not a readable .npz ({type(error).__name__}: {str(error)[:120]}); the file is "
            f"cut short, damaged or not an npz. Pass {_FORMATS}."
        ) from None
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(
            f"input: {path} array {key} has shape {images.shape}; expected a non-empty (N, H, W) or "
            "(N, H, W, C) stack of images."
        )
    if labels is not None and len(labels) != len(images):
        labels = None  # labels that do not line up are not labels of these images
    return images, labels


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image)[None]
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(
            f"input: {path} is not a readable image ({type(error).__name__}). Pass {_FORMATS}."
        ) from None


def read_images(paths: list[Path], split: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Raw images (N, H, W, C) and labels if every input carries them."""
    names: list[str] = []
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for path in paths:
        if not path.exists():
            raise DataError(f"input: {path} does not exist.")
        if path.is_dir():
            raise DataError(
                f"input: {path} is a folder. Pass {_FORMATS} (a shell glob such as DIR/*.png works)."
            )
        if path.suffix.lower() == ".npz":
            array, array_labels = _read_npz(path, split)
            if array_labels is not None:
                labels.append(array_labels)
            names.extend(f"{path.name}[{index}]" for index in range(len(array)))
        else:
            array = _read_image(path)
            names.append(path.name)
        images.append(array if array.ndim == 4 else array[..., None])
    shapes = {array.shape[1:] for array in images}
    if len(shapes) != 1:
        raise DataError(
            f"input: images of different shapes {sorted(shapes)}; resize them to the model's input size."
        )
    all_labels = np.concatenate(labels) if labels and sum(map(len, labels)) == len(names) else None
    return names, np.concatenate(images), all_labels


def _normalized(raw: np.ndarray, manifest: Manifest, bundle: Path) -> np.ndarray:
    """float32 (N, C, H, W) model input from raw (N, H, W, C) pixels, after checking they fit the model."""
    channels, height, width = manifest.input_shape
    if raw.shape[3] != channels:
        kind = {1: "grey", 3: "RGB", 4: "RGBA"}
        raise DataError(
            f"input: the images have {raw.shape[3]} channel(s) ({kind.get(raw.shape[3], 'unknown')}), the model "
            f"takes {channels} ({kind.get(channels, '?')}). Convert them first (e.g. PIL "
            f"Image.convert('{'RGB' if channels == 3 else 'L'}')); hycomp does not guess colours."
        )
    if raw.shape[1:3] != (height, width):
        raise DataError(
            f"input: images are {raw.shape[1]}x{raw.shape[2]} pixels, the model takes {height}x{width}. "
            "Resize them first."
        )
    if raw.dtype != np.uint8:
        raise DataError(
            f"input: pixels are {raw.dtype}, expected uint8 (0-255) as in the training data. Convert them first."
        )
    if manifest.mean is None or manifest.std is None:
        raise ConfigError(
            f"bundle: {bundle / 'manifest.json'} holds no normalization (mean, std); it was not written by "
            "`hycomp export`. Export the model with hycomp export."
        )
    mean = np.asarray(manifest.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (raw.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std


def predict_files(
    bundle_path: Path, inputs: list[Path], split: str = "test", threads: int = 1, engine: str = "onnxruntime"
) -> dict:
    """Class predictions of the bundle, run on ``engine``, for every input image: names, labels, indices,
    accuracy when the inputs carry labels, and the engine's label."""
    if engine not in ENGINES:  # before reading any image: a typo costs nothing
        raise unknown_name("engine", engine, ENGINES)
    folder = _bundle_folder(bundle_path)
    manifest = read_manifest(folder)
    names, raw, labels = read_images(inputs, split)
    images = _normalized(raw, manifest, folder)
    bundle = load_bundle(folder, threads=threads, engine=engine)
    logits = np.concatenate([bundle(images[index : index + 256]) for index in range(0, len(images), 256)])
    predicted = logits.argmax(axis=1)
    class_names = list(manifest.class_names or [str(index) for index in range(logits.shape[1])])
    return {
        "names": names,
        "labels": [class_names[index] for index in predicted],
        "indices": predicted.tolist(),
        "accuracy": float((predicted == labels).mean()) if labels is not None else None,
        "engine": bundle.label(),
    }
