"""One trained model per set of things that determine its weights, kept on disk and shared by trials.

The key (:func:`model_key`) hashes the model-relevant parameters (not the inference-only ones such as
test-time views; without a gate, not what only a gate uses; ``top_k`` only through its clipped value),
the training budget, the seed and the setup (data, model, teachers). Trials that share a key train once:
the others measure the cached model again under their own inference settings.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.moe import MixtureOfExperts, rebuild_moe
from pipelines.serialize import load_checkpoint, save_checkpoint
from search.config import Budget, stable_hash
from search.record import Training
from search.space import GATE_ONLY, INFERENCE_ONLY

__all__ = ["TrainedModel", "ModelCache", "model_key", "inference_settings"]

CACHE_VERSION = 1


@dataclass
class TrainedModel:
    moe: MixtureOfExperts
    description: dict  # what rebuilds it (pipelines.moe.moe_description) plus its ``bits_by_layer``
    training: Training
    seconds: dict[str, float] = field(default_factory=dict)  # training time per stage; empty when cached


def _model_parameters(params: dict) -> dict:
    ignored = {"top_k", *INFERENCE_ONLY}  # top_k counts through effective_top_k
    if int(params.get("num_experts", 1)) == 1:  # a single expert runs without a gate
        ignored |= set(GATE_ONLY)
    return {key: value for key, value in params.items() if key not in ignored}


def model_key(params: dict, budget: Budget, seed: int, setup: str) -> str:
    """What determines the trained weights of ``params``: equal keys, equal models."""
    return stable_hash(
        {"params": _model_parameters(params), "budget": asdict(budget), "seed": seed, "setup": setup}
    )


def inference_settings(params: dict) -> dict:
    """The inference-only parameters of a configuration, with their defaults (one view)."""
    return {key: params.get(key, 1) for key in INFERENCE_ONLY}


class ModelCache:
    """Trained models under ``folder``, one sub-folder per key: ``model.pt``/``model.json`` and
    ``training.json``. A folder appears whole (written aside, then renamed) or not at all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str) -> TrainedModel | None:
        entry = self.folder / key
        record_path = entry / "training.json"
        if not record_path.exists():
            return None
        saved = json.loads(record_path.read_text())
        if saved.get("version") != CACHE_VERSION:
            return None  # written by another hycomp: trained again, and replaced
        description, layers, state = load_checkpoint(entry / "model")
        return TrainedModel(
            rebuild_moe(description, layers, state), description, Training(**saved["training"])
        )

    def put(self, key: str, model: TrainedModel) -> None:
        entry = self.folder / key
        staging = entry.with_name(key + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        save_checkpoint(model.moe, staging / "model", model.description)
        record = {"version": CACHE_VERSION, "training": asdict(model.training)}
        (staging / "training.json").write_text(json.dumps(record, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        try:
            staging.rename(entry)
        except OSError:  # another worker put the same model first
            shutil.rmtree(staging, ignore_errors=True)

    def get_or_train(self, key: str, train: Callable[[], TrainedModel]) -> tuple[TrainedModel, bool]:
        """The cached model of ``key``, or ``train()``'s, cached. The flag says whether it was trained now."""
        cached = self.get(key)
        if cached is not None:
            return cached, False
        model = train()
        self.put(key, model)
        return model, True
