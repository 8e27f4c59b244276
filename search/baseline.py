"""The fp32 teacher: trained once (or loaded from ``model.checkpoint``), cached under results/baselines/,
keyed by dataset, the whole model spec and the training settings. Its record holds val and test accuracy,
MACs, params, size and latency, and where its weights came from."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from pipelines.data import Dataset
from pipelines.files import sha256_file
from pipelines.measure import count_macs, count_params, packed_size_bytes, torch_runner
from pipelines.serialize import describe_model, load_checkpoint, rebuild_model, save_checkpoint
from pipelines.timing import measure_latency
from pipelines.train import TrainConfig, evaluate, train
from search.config import SearchConfig, stable_hash
from search.progress import Units, bars_shown, progress_shown
from search.workspace import baseline_dir

__all__ = [
    "baseline_key",
    "teacher_folder",
    "record_path",
    "get_baseline",
    "load_teacher",
    "member_config",
    "teacher_recipe",
    "teacher_latency",
]

log = logging.getLogger("hycomp")


def teacher_recipe(cfg: SearchConfig) -> TrainConfig:
    """How the fp32 teacher is trained (the experiment trains its plain control with it too)."""
    return cfg.baseline.train_config()


CACHE_FORMAT = 2  # what a cached teacher holds and how it is keyed; older caches are never reused


def baseline_key(cfg: SearchConfig, data: Dataset) -> str:
    """The teacher's cache key: the data's content (pixels, labels, classes), the whole model spec (a
    checkpoint by its sha256), the training recipe and the cache format."""
    identity = {
        "format": CACHE_FORMAT,
        "data": data.fingerprint,
        "model": cfg.model.identity(),
        "train": asdict(teacher_recipe(cfg)),
    }
    arch = re.sub(r"[^\w.-]", "-", cfg.model.arch)  # torchvision:resnet18 -> torchvision-resnet18
    name = re.sub(r"[^\w.-]", "-", data.name)
    return f"{name}-{arch}-{stable_hash(identity)}"


def teacher_folder(cfg: SearchConfig, data: Dataset, root: Path | None = None) -> Path:
    """The cache folder of the teacher of ``cfg`` on ``data`` (its ``teacher`` checkpoint and ``baseline.json``)."""
    return baseline_dir(baseline_key(cfg, data), root)


def load_teacher(folder: Path) -> nn.Module:
    return rebuild_model(*load_checkpoint(folder / "teacher"))


def record_path(cfg: SearchConfig, data: Dataset, root: Path | None = None) -> Path:
    """The teacher's ``baseline.json``: it exists once the teacher is cached."""
    return teacher_folder(cfg, data, root) / "baseline.json"


def teacher_latency(cfg: SearchConfig, model: nn.Module, data: Dataset, threads: int):
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
    record_file = record_path(cfg, data, root)
    folder = record_file.parent
    if record_file.exists():
        log.info("baseline: using cached teacher %s", folder)
        return load_teacher(folder), json.loads(record_file.read_text())
    spec = cfg.model.spec
    train_cfg = teacher_recipe(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.checkpoint is not None:
        log.info("baseline: loading the teacher from %s (cached afterwards in %s)", spec.checkpoint, folder)
        model = spec.build(data.channels, data.num_classes, data.image_size)
        source = f"checkpoint {spec.checkpoint} (sha256 {sha256_file(Path(spec.checkpoint))})"
        training: dict = {"train": None, "train_seconds": 0.0, "resumed_at_step": 0}
    else:
        who = f"teacher seed {train_cfg.seed}"  # workers train several at once: each line says which
        log.info(
            "baseline: training %s (%s) on %s for %s epochs (cached afterwards in %s)",
            spec.arch,
            who,
            data.name,
            train_cfg.epochs,
            folder,
        )
        torch.manual_seed(train_cfg.seed)
        model = spec.build(data.channels, data.num_classes, data.image_size)
        epochs = Units(f"baseline: {who}", math.ceil(train_cfg.epochs), "epoch")
        last_logged = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:  # a long epoch still says something every minute
            if not bars_shown() and time.perf_counter() - last_logged[0] > 60:
                last_logged[0] = time.perf_counter()
                log.info("baseline: %s step %d/%d (%.0f%%)", who, done, total, 100 * done / total)

        def on_epoch(epoch: int, total: int, val_accuracy: float | None) -> None:
            last_logged[0] = time.perf_counter()
            epochs.total = total
            epochs.finished(f"val {val_accuracy:.4f}" if val_accuracy is not None else "", done=epoch)

        progress = folder / "progress.pt"  # each epoch's state: an interrupted teacher resumes there
        try:
            report = train(
                model,
                data.train,
                train_cfg,
                on_step=on_step,
                on_epoch=on_epoch,
                val=data.val if progress_shown() else None,
                checkpoint=progress,
            )
        finally:
            epochs.close()
        progress.unlink(missing_ok=True)
        source = "trained"
        training = {
            "train": asdict(train_cfg),
            "train_seconds": report.seconds,  # of the last run: a resumed teacher counts from resumed_at_step
            "resumed_at_step": report.resumed_at,
        }
    model.eval()
    latency = teacher_latency(cfg, model, data, threads)
    record = {
        "key": folder.name,
        "arch": spec.arch,
        "width": spec.width,
        "model": spec.to_dict(),
        "dataset": data.name,
        "source": source,
        **training,
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
        model, folder / "teacher", describe_model(spec, data.channels, data.num_classes, data.image_size)
    )
    record_file.write_text(json.dumps(record, indent=2))
    return model.eval(), record


def member_config(cfg: SearchConfig, index: int) -> SearchConfig:
    """The configuration of teacher ``index`` of the ensemble: the same recipe at seed ``baseline.seed + index``
    (member 0 is the teacher itself, so a one-teacher study keeps its cache key)."""
    return replace(cfg, baseline=replace(cfg.baseline, seed=cfg.baseline.seed + index))
