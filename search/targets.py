"""The distillation targets of ``kd_targets: ensemble``, computed once per teachers, augment and data.

The targets are the teachers' logits on the train split, averaged over the symmetric views of the
augmentation and over the teachers: minutes on a large dataset. They are kept beside the teachers as
``baselines/targets/<key>.pt`` with a JSON sidecar holding the file's sha256, keyed by the teachers'
cache keys, the augment, the data's content and :data:`TARGETS_FORMAT`, so every search worker, export
and experiment process loads them instead of computing them again. A missing, damaged or foreign file is
computed again and replaced whole (written aside, then renamed): processes that race on it still only
ever read a complete file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipelines.data import Dataset, Split
from pipelines.files import sha256_file
from pipelines.train import ensemble_logits
from search.config import stable_hash
from search.workspace import baseline_dir

__all__ = ["TARGETS_FORMAT", "targets_path", "compute_targets", "distillation_targets"]

log = logging.getLogger("hycomp")

TARGETS_FORMAT = 1  # what a targets file holds and how it is keyed; another format is computed again


def targets_path(teacher_keys: Sequence[str], augment: str, data: Dataset, root: Path | None = None) -> Path:
    """Where the targets of these teachers (by cache key), ``augment`` and ``data`` are kept."""
    identity = {
        "format": TARGETS_FORMAT,
        "teachers": list(teacher_keys),
        "augment": augment,
        "data": data.fingerprint,
    }
    return baseline_dir("targets", root) / f"{stable_hash(identity)}.pt"


PROGRESS_SECONDS = 30.0  # a line at least this often while the targets are computed


def compute_targets(teachers: Sequence[nn.Module], split: Split, augment: str) -> torch.Tensor:
    """The teachers' logits on ``split`` averaged over the views of ``augment``, then over the teachers;
    a progress line every :data:`PROGRESS_SECONDS` (large datasets take minutes)."""
    started = last = time.perf_counter()
    logits = []
    for number, teacher in enumerate(teachers, start=1):

        def on_batch(done: int, total: int, number: int = number) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last >= PROGRESS_SECONDS or (done == total and number == len(teachers)):
                last = now
                fraction = ((number - 1) + done / total) / len(teachers)
                eta = (now - started) * (1 - fraction) / fraction if fraction > 0 else float("nan")
                log.info(
                    "distillation targets: teacher %d/%d, batch %d/%d (%.0f%%, ETA %.0f s)",
                    number,
                    len(teachers),
                    done,
                    total,
                    100 * fraction,
                    eta,
                )

        logits.append(ensemble_logits(teacher, split, augment, on_batch=on_batch))
    return torch.stack(logits).mean(dim=0)


def distillation_targets(
    teachers: Sequence[nn.Module],
    teacher_keys: Sequence[str],
    data: Dataset,
    augment: str,
    root: Path | None = None,
) -> torch.Tensor:
    """The targets of ``teachers`` (whose cache keys are ``teacher_keys``) on ``data``'s train split: loaded
    when a checked file is kept, else computed and kept for the next process."""
    path = targets_path(teacher_keys, augment, data, root)
    shape = (len(data.train), data.num_classes)
    logits, problem = _load(path, shape)
    if logits is not None:
        log.info("distillation targets: loaded %s", path)
        return logits
    log.info(
        "distillation targets: computing %d teacher(s) x %s views of %d train images (%s)",
        len(teachers),
        augment,
        len(data.train),
        problem,
    )
    started = time.perf_counter()
    logits = compute_targets(teachers, data.train, augment)
    _save(path, logits)
    log.info("distillation targets: done in %.0f s, kept in %s", time.perf_counter() - started, path)
    return logits


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _load(path: Path, shape: tuple[int, int]) -> tuple[torch.Tensor | None, str]:
    """(the kept targets, "") when ``path`` holds them whole and of ``shape``; else (None, why not)."""
    if not path.exists():
        return None, "none kept yet"
    try:
        record = json.loads(_sidecar(path).read_text())
        if not isinstance(record, dict) or record.get("format") != TARGETS_FORMAT:
            return None, f"{path.name} is of another format"
        if record.get("sha256") != sha256_file(path):
            return None, f"{path.name} does not match its checksum"
        logits = torch.load(path, weights_only=True)
    except Exception as error:  # a truncated, foreign or unpicklable file: computed again
        return None, f"{path.name} is unreadable ({type(error).__name__})"
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != shape or not logits.is_floating_point():
        return None, f"{path.name} holds no {shape[0]} x {shape[1]} logits"
    return logits, ""


def _save(path: Path, logits: torch.Tensor) -> None:
    """Write ``logits`` and their sidecar aside, then rename each into place (a reader that finds the new
    file under the old sidecar sees a checksum mismatch and computes the targets itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    staging_sidecar = Path(staging).with_suffix(".json.partial")
    try:
        torch.save(logits.detach().clone().contiguous(), staging)
        record = {
            "format": TARGETS_FORMAT,
            "sha256": sha256_file(Path(staging)),
            "shape": list(logits.shape),
        }
        staging_sidecar.write_text(json.dumps(record, indent=2))
        Path(staging).replace(path)
        staging_sidecar.replace(_sidecar(path))
    finally:
        Path(staging).unlink(missing_ok=True)
        staging_sidecar.unlink(missing_ok=True)
