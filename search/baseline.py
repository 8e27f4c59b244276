"""The fp32 teacher: trained once, cached under results/baselines/, keyed by dataset, architecture and
training settings. Its record holds val and test accuracy, MACs, params, size and latency."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from pipelines.data import Dataset
from pipelines.measure import count_macs, count_params, packed_size_bytes, torch_runner
from pipelines.models import build_model
from pipelines.serialize import load_checkpoint, resize_layers, save_checkpoint
from pipelines.timing import measure_latency
from pipelines.train import TrainConfig, evaluate, predict_logits, train
from search.space import SearchConfig, stable_hash
from search.workspace import baseline_dir

__all__ = ["baseline_key", "get_baseline", "get_teachers", "load_teacher", "member_config", "teacher_recipe"]

log = logging.getLogger("hycomp")


def teacher_recipe(cfg: SearchConfig) -> TrainConfig:
    """How the fp32 teacher is trained (the experiment trains its plain control with it too)."""
    settings = cfg.baseline
    return TrainConfig(
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        label_smoothing=settings.label_smoothing,
        schedule=settings.schedule,
        augment=settings.augment,
        seed=settings.seed,
        precision=settings.precision,
    )


def baseline_key(cfg: SearchConfig) -> str:
    identity = {
        "dataset": cfg.data.dataset,
        "size": cfg.data.size,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "train": asdict(teacher_recipe(cfg)),
    }
    if identity["train"]["augment"] == "flips":  # written as `True` before the other policies existed:
        identity["train"]["augment"] = True  # keeps the teachers cached then (20 min each) valid
    if identity["train"]["precision"] == "fp32":  # keys from before the precision setting stay valid
        del identity["train"]["precision"]
    return f"{cfg.data.dataset}-{cfg.model.arch}-{stable_hash(identity)}"


def load_teacher(folder: Path) -> nn.Module:
    description, layers, state = load_checkpoint(folder / "teacher")
    model = build_model(
        description["arch"], description["in_channels"], description["num_classes"], description["width"]
    )
    resize_layers(model, layers)
    model.load_state_dict(state)
    return model.eval()


def _record_path(cfg: SearchConfig, root: Path | None) -> Path:
    return baseline_dir(baseline_key(cfg), root) / "baseline.json"


def _teacher_latency(cfg: SearchConfig, model: nn.Module, data: Dataset, threads: int):
    return measure_latency(
        torch_runner(model, data.val.images[:1], threads),
        backend="torch-fp32-eager",
        threads=threads,
        batch=1,
        repeats=cfg.measure.latency_repeats,
    )


def get_baseline(
    cfg: SearchConfig, data: Dataset, root: Path | None = None, threads: int = 1
) -> tuple[nn.Module, dict]:
    """Load the cached teacher for ``cfg`` or train and cache it. Returns (teacher, record)."""
    record_path = _record_path(cfg, root)
    folder = record_path.parent
    if record_path.exists():
        log.info("baseline: using cached teacher %s", folder)
        return load_teacher(folder), json.loads(record_path.read_text())
    train_cfg = teacher_recipe(cfg)
    log.info(
        "baseline: training %s on %s for %s epochs (cached afterwards in %s)",
        cfg.model.arch,
        data.name,
        train_cfg.epochs,
        folder,
    )
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg.model.arch, data.channels, data.num_classes, cfg.model.width)
    last_logged = [time.perf_counter()]

    def on_step(done: int, total: int) -> None:
        if time.perf_counter() - last_logged[0] > 30 or done == total:
            last_logged[0] = time.perf_counter()
            log.info("baseline: step %d/%d (%.0f%%)", done, total, 100 * done / total)

    progress = folder / "progress.pt"  # each epoch's state: an interrupted teacher resumes there
    report = train(model, data.train, train_cfg, on_step=on_step, checkpoint=progress)
    latency = _teacher_latency(cfg, model, data, threads)
    record = {
        "key": folder.name,
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "dataset": data.name,
        "train": asdict(train_cfg),
        "train_seconds": report.seconds,  # of the last run: a resumed teacher counts from resumed_at_step
        "resumed_at_step": report.resumed_at,
        "val_accuracy": evaluate(model, data.val),
        "test_accuracy": evaluate(model, data.test),  # reported only; never used to choose anything
        "macs": count_macs(model, data.val.images[:8]),
        "params": count_params(model),
        "size_bytes_fp32": packed_size_bytes(model, 32),
        "size_bytes_int8": packed_size_bytes(model, 8),
        "latency": latency.as_dict(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_checkpoint(
        model,
        folder / "teacher",
        {
            "arch": cfg.model.arch,
            "width": cfg.model.width,
            "in_channels": data.channels,
            "num_classes": data.num_classes,
        },
    )
    record_path.write_text(json.dumps(record, indent=2))
    progress.unlink(missing_ok=True)
    return model.eval(), record


def member_config(cfg: SearchConfig, index: int) -> SearchConfig:
    """The configuration of teacher ``index`` of the ensemble: the same recipe at seed ``baseline.seed + index``
    (member 0 is the teacher itself, so a one-teacher study keeps its cache key)."""
    return replace(cfg, baseline=replace(cfg.baseline, seed=cfg.baseline.seed + index))


def _train_member(cfg: SearchConfig, root: Path | None, threads: int) -> str:
    """Worker of :func:`get_teachers` with ``jobs > 1``: train and cache one member (its own data copy)."""
    from search.study import load_data  # search.study imports this module

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
    missing = [member for member in members if not _record_path(member, root).exists()]
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
            record["latency"] = _teacher_latency(member, teacher, data, threads).as_dict()
            _record_path(member, root).write_text(json.dumps(record, indent=2))
        teachers.append(teacher)
        records.append(record)
    record = dict(records[0])
    if len(teachers) > 1:

        def accuracy(split) -> float:
            logits = torch.stack([predict_logits(teacher, split) for teacher in teachers]).mean(dim=0)
            return float((logits.argmax(dim=1) == split.labels).float().mean())

        record["ensemble"] = {
            "members": [member["key"] for member in records],
            "member_test_accuracy": [member["test_accuracy"] for member in records],
            "val_accuracy": accuracy(data.val),
            "test_accuracy": accuracy(data.test),
            "macs": sum(member["macs"] for member in records),
        }
        log.info(
            "teacher ensemble of %d: val %.4f, test %.4f (members' test: %s)",
            len(teachers),
            record["ensemble"]["val_accuracy"],
            record["ensemble"]["test_accuracy"],
            ", ".join(f"{member['test_accuracy']:.4f}" for member in records),
        )
    return teachers, record
