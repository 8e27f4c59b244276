"""model.onnx alone against `hycomp predict`: a bare ``onnxruntime.InferenceSession`` on a bundle's one-file
MoE, with the manifest's normalization done by hand, must give the classes `hycomp predict` gives.

    python -m search.benchmarks.single_file_agreement results/<study>/trials/trial_17/bundle \\
        ../shared/data/bloodmnist.npz

Prints the agreement over the file's test images (a deployment check: nothing is chosen with it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from search.predict import predict_files


def plain_predictions(bundle: Path, data: Path) -> np.ndarray:
    """Classes from ``bundle/model.onnx`` with onnxruntime and numpy only."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    with np.load(data) as npz:
        raw = npz["test_images"].astype(np.float32) / 255.0
    images = (raw[..., None] if raw.ndim == 3 else raw).transpose(0, 3, 1, 2)
    mean = np.asarray(manifest["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest["std"], np.float32).reshape(1, -1, 1, 1)
    images = ((images - mean) / std).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: images[i : i + 256]})[0] for i in range(0, len(images), 256)]
    return np.concatenate(logits).argmax(axis=1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m search.benchmarks.single_file_agreement BUNDLE DATA.npz", file=sys.stderr)
        return 2
    bundle, data = Path(args[0]), Path(args[1])
    plain = plain_predictions(bundle, data)
    hycomp = np.asarray(predict_files(bundle, [data])["indices"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    print(
        f"{bundle}: {len(plain)} test images, agreement {float((plain == hycomp).mean()):.6f} "
        f"({manifest.get('num_experts')} expert(s), top-{manifest.get('top_k')}, {manifest.get('views')} view(s))"
    )
    return 0 if (plain == hycomp).all() else 1


if __name__ == "__main__":
    sys.exit(main())
