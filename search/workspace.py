"""Where outputs go. Only the ``search`` layer writes under ``results/``.

results/
  baselines/<dataset>-<arch>-<hash>/   cached fp32 teachers (teacher.pt/.json, baseline.json)
  baselines/targets/<hash>.pt/.json    their distillation targets per augment and data (search.targets)
  baselines/ensembles/<hash>.json      a teacher ensemble's val/test accuracy
  baselines/probes/<hash>.json         the symmetry probe of a dataset (augment: auto)
  <study>/config.yaml                  the resolved search space of the study
  <study>/study.db                     Optuna storage (SQLite) unless --storage says otherwise
  <study>/trials/trial_<n>/            each trial's compressed MoE (checkpoint) and ONNX bundle
  <study>/front.csv, front.png         written by `hycomp front`
  <study>/export/trial_<n>/            written by `hycomp export`
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.errors import ConfigError

__all__ = ["results_root", "study_dir", "baseline_dir", "resolve_study_dir"]


def results_root() -> Path:
    """``$HYCOMP_RESULTS`` or ``./results``."""
    return Path(os.environ.get("HYCOMP_RESULTS", "results"))


def study_dir(name: str, root: Path | None = None) -> Path:
    """``<results root>/<name>``: always a folder of its own directly inside the results root."""
    root = root or results_root()
    folder = root / name
    if name in ("", ".", "..") or folder.resolve().parent != root.resolve():
        raise ConfigError(
            f"study.name: {name!r} would put the study at {folder.resolve()}, outside its own folder under the "
            f"results root {root.resolve()}. Use a plain folder name such as bloodmnist-resnet20."
        )
    return folder


def baseline_dir(key: str, root: Path | None = None) -> Path:
    return (root or results_root()) / "baselines" / key


def resolve_study_dir(path: str | os.PathLike) -> Path:
    """The folder of an existing study (``results/<study>``, or a study name under results/)."""
    candidate = Path(path)
    for folder in (candidate, results_root() / candidate):
        if (folder / "config.yaml").exists():
            return folder
    raise ConfigError(
        f"study folder: {str(path)!r} holds no config.yaml. Pass the folder that `hycomp search` created, "
        f"e.g. {results_root() / '<study name>'}."
    )
