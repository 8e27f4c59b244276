"""What a search needs before its first trial: the data, the fp32 teachers and the trial context.

Every command that trains or measures (search, its worker processes, export, the benchmarks) builds these
here, from the config alone, so a spawned process rebuilds exactly what its parent had.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from pipelines.data import Dataset, load_dataset
from pipelines.symmetry_probe import ProbeConfig
from pipelines.symmetry_probe import resolve_augment as choose_augment
from pipelines.train import predict_logits
from search.baseline import baseline_key, get_baseline, member_config, record_path, teacher_latency
from search.config import AUTO, SearchConfig, resolved_augment, stable_hash
from search.evaluation import TrialContext
from search.workspace import baseline_dir

__all__ = ["load_data", "resolve_augment", "get_teachers", "teacher_keys", "trial_context"]

PROBE_FORMAT = 2  # 2: class-balanced accuracy beside plain accuracy; other probe records are not reused
log = logging.getLogger("hycomp")


def load_data(cfg: SearchConfig) -> Dataset:
    """The dataset a search config names, loaded with its data settings."""
    return load_dataset(
        cfg.data.dataset,
        cfg.data.root,
        size=cfg.data.size,
        download=cfg.data.download,
        verify_md5=cfg.data.verify_md5,
        path=cfg.data.path,
        split_seed=cfg.data.split_seed,
    )


def resolve_augment(
    cfg: SearchConfig, data: Dataset, root: Path | None = None
) -> tuple[SearchConfig, dict | None]:
    """``cfg`` with ``augment: auto`` replaced by the symmetry probe's choice on ``data``, and the probe's
    record (None when nothing was ``auto``). The probe runs once per dataset and is cached beside the
    teachers (keyed by the data's content), so workers, export and experiment agree without probing again."""
    sections = (cfg.baseline.augment, cfg.trial.augment, cfg.export.augment)
    if AUTO not in sections:
        return cfg, None
    # keyed by the data's content and how the probe runs (its settings, its format)
    identity = stable_hash({"format": PROBE_FORMAT, "probe": asdict(ProbeConfig())})
    cache = baseline_dir("probes", root) / f"{data.fingerprint[:24]}-{identity}.json"
    record = None
    if cache.exists():
        try:
            record = json.loads(cache.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("augment"), str):
            record = None  # a damaged cache file: probe again
    if record is None:
        log.info(
            "%s: augment auto: probing which symmetries keep the labels (a small net, seconds)", data.name
        )
        _, probe = choose_augment(AUTO, data)
        record = {**probe.to_dict(), "summary": probe.summary()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(cache)
    log.info("%s: %s", data.name, record["summary"])
    return resolved_augment(cfg, record["augment"]), record


def _train_member(cfg: SearchConfig, root: Path | None, threads: int) -> str:
    """Worker of :func:`get_teachers` with ``jobs > 1``: train and cache one member (its own data copy)."""
    _, record = get_baseline(cfg, load_data(cfg), root, threads)
    return record["key"]


def get_teachers(
    cfg: SearchConfig, data: Dataset, root: Path | None = None, threads: int = 1, jobs: int = 1
) -> tuple[list[nn.Module], dict]:
    """The ``baseline.teachers`` fp32 teachers (each trained once and cached, like :func:`get_baseline`).

    The first is the teacher that is compressed; students distil from all of them (``kd_targets:
    ensemble`` averages their logits). Returns (teachers, record of the first); with more than one, the
    record's ``ensemble`` entry holds the members' cache keys and the val/test accuracy of their averaged
    logits (test is reported only, never used to choose).

    ``jobs > 1`` trains the members not cached yet side by side, each process pinned to its share of the
    CPUs (:func:`search.pool.run_pinned`): with 2 cores, two teachers at one thread each take about the time
    of one at two threads. Each member is cached as it finishes, so an interrupted run keeps the finished.
    """
    members = [member_config(cfg, index) for index in range(cfg.baseline.teachers)]
    missing = [member for member in members if not record_path(member, data, root).exists()]
    parallel = jobs > 1 and len(missing) > 1
    if parallel:
        from search.pool import run_pinned

        log.info("baseline: training %d teachers, %d at a time", len(missing), min(jobs, len(missing)))
        run_pinned(
            _train_member,
            [(member, root, threads) for member in missing],
            jobs,
            lambda job, key: log.info("baseline: teacher %s cached", key),
        )
    teachers, records = [], []
    for member in members:
        teacher, record = get_baseline(member, data, root, threads)
        if parallel and member in missing:
            # measured while the other members trained beside it: measure again on a quiet machine
            record["latency"] = teacher_latency(member, teacher, data, threads).as_dict()
            record_path(member, data, root).write_text(json.dumps(record, indent=2))
        teachers.append(teacher)
        records.append(record)
    record = dict(records[0])
    if len(teachers) > 1:
        record["ensemble"] = _ensemble_record(teachers, records, data, root)
        log.info(
            "teacher ensemble of %d: val %.4f, test %.4f (members' test: %s)",
            len(teachers),
            record["ensemble"]["val_accuracy"],
            record["ensemble"]["test_accuracy"],
            ", ".join(f"{member['test_accuracy']:.4f}" for member in records),
        )
    return teachers, record


def _ensemble_record(
    teachers: list[nn.Module], records: list[dict], data: Dataset, root: Path | None
) -> dict:
    """The members' keys and the val/test accuracy of their averaged logits: computed once per member set
    (the keys cover the data) and kept under baselines/ensembles/, so worker processes only read it."""
    members = [member["key"] for member in records]
    cache = baseline_dir("ensembles", root) / f"{stable_hash({'members': members})}.json"
    try:
        kept = json.loads(cache.read_text())
        if kept["members"] == members and all(
            isinstance(kept[name], float) for name in ("val_accuracy", "test_accuracy")
        ):
            return kept
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none kept yet, or a damaged file: computed again

    def accuracy(split) -> float:
        logits = torch.stack([predict_logits(teacher, split) for teacher in teachers]).mean(dim=0)
        return float((logits.argmax(dim=1) == split.labels).float().mean())

    ensemble = {
        "members": members,
        "member_test_accuracy": [member["test_accuracy"] for member in records],
        "val_accuracy": accuracy(data.val),
        "test_accuracy": accuracy(data.test),
        "macs": sum(member["macs"] for member in records),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_name(f"{cache.stem}.{os.getpid()}.partial")
    staging.write_text(json.dumps(ensemble, indent=2))
    staging.replace(cache)
    return ensemble


def trial_context(
    cfg: SearchConfig, data: Dataset, study_folder: Path, jobs: int = 1
) -> tuple[TrialContext, dict]:
    """The context trials of ``cfg`` run in, for the study in ``study_folder`` (teachers cached beside it,
    trained or loaded ``jobs`` at a time), and the record of the first teacher."""
    teachers, record = get_teachers(
        cfg, data, study_folder.parent, threads=cfg.measure.latency_threads, jobs=jobs
    )
    context = TrialContext(
        cfg, data, teachers[0], study_folder, distill_from=teachers, teacher_keys=teacher_keys(cfg, data)
    )
    return context, record


def teacher_keys(cfg: SearchConfig, data: Dataset) -> tuple[str, ...]:
    """The cache keys of the ``baseline.teachers`` teachers of ``cfg`` on ``data``, in order."""
    return tuple(baseline_key(member_config(cfg, index), data) for index in range(cfg.baseline.teachers))
