"""Run an exported bundle on new images with ONNX Runtime alone (no NNI, no training code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.deploy import load_bundle
from pipelines.errors import ConfigError, DataError

__all__ = ["predict_files", "read_images"]


def _bundle_folder(path: Path) -> Path:
    for candidate in (path, path / "bundle"):
        if (candidate / "manifest.json").exists():
            return candidate
    raise ConfigError(
        f"bundle: {path} holds no manifest.json. Pass an export's bundle/ folder (results/<study>/export/trial_<n>/bundle)."
    )


def read_images(paths: list[Path], split: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Raw uint8 images (N, H, W[, C]) and labels if the input carries them."""
    names: list[str] = []
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for path in paths:
        if not path.exists():
            raise DataError(f"input: {path} does not exist.")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                key = f"{split}_images" if f"{split}_images" in npz else "images"
                if key not in npz:
                    raise DataError(
                        f"input: {path} has neither {split}_images nor images arrays (it has {', '.join(npz.files)})."
                    )
                array = npz[key]
                label_key = key.replace("images", "labels")
                if label_key in npz:
                    labels.append(np.asarray(npz[label_key]).reshape(-1))
            names.extend(f"{path.name}[{index}]" for index in range(len(array)))
            images.append(array)
        else:
            from PIL import Image

            with Image.open(path) as image:
                images.append(np.asarray(image)[None])
            names.append(path.name)
    shapes = {array.shape[1:] for array in images}
    if len(shapes) != 1:
        raise DataError(
            f"input: images of different shapes {sorted(shapes)}; resize them to the model's input size."
        )
    all_labels = np.concatenate(labels) if labels and sum(map(len, labels)) == len(names) else None
    return names, np.concatenate(images), all_labels


def predict_files(bundle_path: Path, inputs: list[Path], split: str = "test", threads: int = 1) -> dict:
    folder = _bundle_folder(bundle_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    names, raw, labels = read_images(inputs, split)
    channels, height, width = manifest["input_shape"]
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.shape[1:] != (height, width, channels):
        if raw.shape[1:3] == (height, width) and channels == 3 and raw.shape[3] == 1:
            raw = np.repeat(raw, 3, axis=3)
        else:
            raise DataError(
                f"input: images have shape {raw.shape[1:]}, the model expects ({height}, {width}, {channels}). "
                "Resize/convert the images first."
            )
    mean = np.asarray(manifest["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    images = (raw.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean) / std
    bundle = load_bundle(folder, threads=threads)
    logits = np.concatenate([bundle(images[index : index + 256]) for index in range(0, len(images), 256)])
    predicted = logits.argmax(axis=1)
    class_names = manifest.get("class_names") or [str(index) for index in range(logits.shape[1])]
    result = {
        "names": names,
        "labels": [class_names[index] for index in predicted],
        "indices": predicted.tolist(),
    }
    result["accuracy"] = float((predicted == labels).mean()) if labels is not None else None
    return result
