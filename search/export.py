"""Export: materialize one point of the front into results/<study>/export/trial_<n>/.

Written there:
  config.yaml            the resolved search config plus the trial's parameters
  model.pt / model.json  the compressed MoE (state_dict, weights_only) + what rebuilds it, with its sha256
  bundle/                the deployable ONNX Runtime bundle (gate + experts, int8 unless 32-bit) + manifest
  report.md / .json      TEST accuracy, MACs, size, latency beside the baseline's, measured in this run

Export reloads what it wrote and checks that it reproduces the trial's validation accuracy.
With ``retrain=True`` the configuration is compressed again at the full export budget (multi-fidelity:
trials are cheap, the exported point is not); its validation accuracy is then reported beside the trial's.

:mod:`search.candidates` retrains the best few points at the full budget before one is exported;
:mod:`search.export_report` renders the report.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml

from pipelines.data import Dataset
from pipelines.deploy.bundle import agreement, remerge_single_file
from pipelines.deploy.int8 import INT8_RECIPE, quantize_onnx_int8
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.routing_cost import measure_routing_overhead
from pipelines.deploy.runtime import OrtModel, load_bundle, load_single_file, measure_moe_latency
from pipelines.errors import ConfigError, HycompError
from pipelines.measure import torch_runner
from pipelines.moe import rebuild_moe
from pipelines.serialize import load_checkpoint
from pipelines.timing import measure_interleaved, measure_latency
from pipelines.train import evaluate
from search.config import SearchConfig, stable_hash
from search.evaluation import TrialContext, train_and_measure
from search.export_report import render_report, weight_grid_totals
from search.latency import reference_bundle, stored_reference
from search.record import TrialRecord
from search.setup import get_teachers, load_data, teacher_keys

__all__ = [
    "export_trial",
    "export_context",
    "check_target",
    "default_target",
    "bundle_accuracy",
    "EXPORT_KIND",
]

log = logging.getLogger("hycomp")

REPRODUCE_TOLERANCE = 1e-6


def bundle_accuracy(bundle, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    logits = np.concatenate([bundle(images[index : index + batch]) for index in range(0, len(images), batch)])
    return float((logits.argmax(axis=1) == labels).mean())


def _baseline_engine_latency(teacher, data: Dataset, folder: Path, threads: int, repeats: int) -> dict:
    """Baseline latency on ONNX Runtime fp32 and int8, measured now (same run as the export)."""
    onnx_folder = folder / "baseline_onnx"
    onnx_folder.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(teacher, data.val.images[:1], onnx_folder / "teacher.onnx")
    int8 = quantize_onnx_int8(fp32, onnx_folder / "teacher.int8.onnx", data.train.images[:256])
    image = data.val.images[:1].numpy()
    results = {}
    for name, path in (("onnxruntime-fp32", fp32), ("onnxruntime-int8", int8)):
        model = OrtModel(path, threads=threads)
        results[name] = measure_latency(
            lambda m=model: m(image), backend=name, threads=threads, batch=1, repeats=repeats
        ).as_dict()
    results["torch-fp32-eager"] = measure_latency(
        torch_runner(teacher, data.val.images[:1], threads),
        backend="torch-fp32-eager",
        threads=threads,
        batch=1,
        repeats=repeats,
    ).as_dict()
    shutil.rmtree(onnx_folder)
    return results


def _against_reference(
    study: optuna.Study,
    study_folder: Path,
    bundle: Path,
    images: np.ndarray,
    threads: int,
    macs_ratio: float,
    deployed_now: bool,
    large_batch: int,
) -> dict:
    """The exported ``model.onnx`` timed interleaved with the study's int8 teacher (its reference bundle, made
    by the study's int8 recipe, on the study's engine) at batch 1 and 64: {"batch_<n>": row} with the
    latency ratio beside the MACs ratio and both files' int8 recipes (``deployed_now``: the export was
    retrained and deployed by this version; else its files are the trial's). ``large_batch`` (the study's
    throughput batch) replaces 64. Empty without a reference."""
    reference = stored_reference(study)
    folder = reference_bundle(study_folder)
    if reference is None or not (folder / "manifest.json").exists():
        return {}
    teacher = load_bundle(folder, threads=threads, engine=reference.engine)
    exported = load_single_file(bundle, threads, reference.engine)
    rows = {}
    for batch in (1, large_batch):
        inputs = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        stats = measure_interleaved(
            lambda x=inputs: exported(x),
            lambda x=inputs: teacher(x),
            rounds=10,
            calls_per_round=20 if batch == 1 else 2,
            warmup=3,
            backend=reference.engine,
            threads=threads,
            batch=batch,
        )
        rows[f"batch_{batch}"] = {
            **stats.as_row(),
            "engine": f"{reference.engine} {reference.version}",
            "macs_ratio": macs_ratio,
            "ratio_over_macs": stats.ratio / macs_ratio,
            "teacher_int8_recipe": reference.int8_recipe,
            "exported_int8_recipe": INT8_RECIPE if deployed_now else reference.int8_recipe,
        }
    return rows


def export_trial(
    cfg: SearchConfig,
    study: optuna.Study,
    study_folder: Path,
    trial_number: int,
    *,
    reason: str = "",
    retrain: bool = False,
    force: bool = False,
    out: Path | None = None,
    prepared: tuple[Path, TrialRecord] | None = None,
    candidates: list[dict] | None = None,
) -> dict:
    """Export ``trial_number``; returns the report dict (also written as report.json / report.md).

    ``prepared``: (folder, record) of this trial already retrained at the full budget (by
    :func:`export_best`), exported as is instead of training a third time; ``candidates``: the rows of
    that comparison, written into the report."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
    if trial is None or trial.state != optuna.trial.TrialState.COMPLETE:
        raise ConfigError(f"--trial: {trial_number} is not a completed trial of study {study.study_name!r}.")
    target = out or default_target(study_folder, trial_number, retrain)
    check_target(target, study_folder, force)
    recorded = TrialRecord.of(trial)
    # A trial that reused an identical earlier trial's result has its model in that trial's folder.
    owner = trial_number if recorded.repeat_of is None else recorded.repeat_of
    source = study_folder / "trials" / f"trial_{owner}"
    if not retrain and prepared is None and not (source / "model.json").exists():
        raise ConfigError(
            f"trial {trial_number} has no saved model at {source} (the folder was deleted or the trial ran "
            "elsewhere). Pass --retrain to compress its configuration again."
        )
    started = time.perf_counter()
    data, teachers, baseline = _loaded(cfg, study_folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    threads = cfg.measure.latency_threads
    params = recorded.parameters(trial.params)
    try:
        if retrain and prepared is None:
            record = train_and_measure(
                export_context(cfg, study_folder),
                params,
                cfg.export,
                staging,
                seed=cfg.seed,
                threads=threads,
                repeats=cfg.measure.latency_repeats,
                label=f"export trial {trial_number}",
            )
        else:  # the files of the trial, or of its full-budget retraining, copied as they are
            source, record = prepared or (source, recorded)
            for name in ("model.pt", "model.json"):
                shutil.copy2(source / name, staging / name)
            shutil.copytree(source / "bundle", staging / "bundle")
            remerge_single_file(staging / "bundle")  # the one deployed file with this version's routing graph
        description, layers, state = load_checkpoint(staging / "model")
        moe = rebuild_moe(description, layers, state)
        torch_val = evaluate(moe, data.val)
        bundle = load_bundle(staging / "bundle", threads=threads)
        deployed_val = bundle_accuracy(bundle, data.val.images.numpy(), data.val.labels.numpy())
        measured, training = record.measurement, record.training
        expected = measured.val_accuracy
        if (not retrain or prepared is not None) and abs(deployed_val - expected) > REPRODUCE_TOLERANCE:
            raise HycompError(
                f"export of trial {trial_number} does not reproduce its validation accuracy: {deployed_val:.6f} "
                f"now vs {expected:.6f} recorded. The saved files may have changed; re-run the trial."
            )
        # The test split is read here, once, for the exported model only.
        test_images, test_labels = data.test.images.numpy(), data.test.labels.numpy()
        report = {
            "kind": EXPORT_KIND,
            "study": study.study_name,
            "trial": trial_number,
            "picked_because": reason or f"trial {trial_number}",
            "retrained_at_full_budget": retrain,
            "candidates": candidates or [],
            "params": params,
            "dataset": data.name,
            "exported": {
                "test_accuracy": bundle_accuracy(bundle, test_images, test_labels),
                "test_accuracy_torch": evaluate(moe, data.test),
                "val_accuracy": deployed_val,
                "val_accuracy_torch": torch_val,
                "trial_val_accuracy": trial.values[0],
                "mmacs": measured.mmacs,
                "size_kb": measured.size_kb,
                "params": measured.params,
                "achieved_sparsity": training.achieved_sparsity,
                "precision": measured.precision,
                "bits": params.get("bits"),
                "latency": measure_moe_latency(
                    bundle,
                    test_images[:1],
                    threads=threads,
                    batch=1,
                    repeats=max(50, cfg.measure.latency_repeats),
                ),
                "latency_batch64": measure_moe_latency(
                    bundle, test_images[:64], threads=threads, batch=64, repeats=10, warmup=2
                ),
                # model.onnx against the study's int8 teacher, interleaved, batch 1 and 64 (issue #25's yardstick)
                "against_teacher": _against_reference(
                    study,
                    study_folder,
                    staging / "bundle",
                    test_images[:64],
                    threads,
                    measured.mmacs / (baseline["macs"] / 1e6),
                    deployed_now=retrain,  # retrained (or taken from export_best's retraining): deployed now
                    large_batch=cfg.measure.throughput_batch or 64,
                ),
                # model.onnx (the one deployed file) against its chosen experts alone, per engine
                "routing_overhead": measure_routing_overhead(
                    staging / "bundle", test_images[:64], threads=threads, repeats=100, warmup=10
                ),
                "agreement_with_torch": agreement(moe, bundle, data.val.images),  # the whole val split
                "engine_weight_grid": weight_grid_totals(bundle.manifest),
                "routing_per_class": measured.routing_per_class,
            },
            "baseline": {
                "arch": baseline["arch"],
                "test_accuracy": baseline["test_accuracy"],
                "val_accuracy": baseline["val_accuracy"],
                "mmacs": baseline["macs"] / 1e6,
                "size_kb_fp32": baseline["size_bytes_fp32"] / 1024,
                "params": baseline["params"],
                "ensemble": baseline.get("ensemble"),  # the distillation source when baseline.teachers > 1
                "latency": _baseline_engine_latency(
                    teachers[0], data, staging, threads, max(50, cfg.measure.latency_repeats)
                ),
            },
            "conventions": {
                "macs": "multiply-accumulates of Conv2d/Linear per input actually executed (gate + chosen experts); FLOPs = 2 x MACs",
                "size": "weights packed at their bit-width + fp32 per-channel scale and bias",
                "latency": "median of repeated runs after warm-up; backend, threads and batch recorded beside each",
                "low_bit": "weights below 8 bits are quantized to their levels and counted packed, but executed by the int8 engine, which holds NNI's levels exactly (8-bit ones outside the gate and first convs are rounded to its [-64, 64] grid)",
            },
            "class_names": data.class_names,
            "seconds": time.perf_counter() - started,
        }
        _check_routing_share(report, cfg, study, trial_number)
        _check_latency_per_mac(report, cfg, trial_number)
        config = cfg.to_dict()
        config["exported_trial"] = {"number": trial_number, "params": params}
        (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        (staging / "report.md").write_text(render_report(report))
        check_target(target, study_folder, force)  # again: the folder may have changed meanwhile
        if target.exists():
            shutil.rmtree(target)  # an earlier export (checked just above) or an empty folder
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["folder"] = str(target)
    return report


def _check_routing_share(report: dict, cfg: SearchConfig, study: optuna.Study, trial_number: int) -> None:
    """Note in ``report`` (and warn) when a multi-expert export spends more of its batch-1 latency on gate
    and routing, on the study's engine, than ``constraints.max_routing_share`` allows."""
    limit = cfg.constraints.max_routing_share
    reference = stored_reference(study)
    engine = reference.engine if reference is not None else "onnxruntime"
    overhead = report["exported"].get("routing_overhead") or {}
    timing = overhead.get(engine, {}).get("batch_1")
    if limit is None or timing is None or report["params"].get("num_experts", 1) <= 1:
        return
    share = timing["routing_share"]
    report["exported"]["routing_limit"] = {"engine": engine, "max_routing_share": limit, "share": share}
    if share > limit:
        log.warning(
            "export of trial %d: gate + routing take %.1f%% of model.onnx's batch-1 latency on %s, over "
            "constraints.max_routing_share %.0f%%; a single net of its experts' size may serve better",
            trial_number,
            100 * share,
            engine,
            100 * limit,
        )


def _check_latency_per_mac(report: dict, cfg: SearchConfig, trial_number: int) -> None:
    """Note in ``report`` (and warn) when the export's latency ratio to the teacher at the throughput batch is
    more than ``constraints.max_latency_per_mac`` times its MACs ratio."""
    limit, batch = cfg.constraints.max_latency_per_mac, cfg.measure.throughput_batch
    row = (report["exported"].get("against_teacher") or {}).get(f"batch_{batch}")
    if limit is None or row is None:
        return
    value = row["ratio_over_macs"]
    report["exported"]["latency_per_mac_limit"] = {
        "batch": batch,
        "max_latency_per_mac": limit,
        "latency_per_mac": value,
    }
    if value > limit:
        log.warning(
            "export of trial %d: at batch %d it runs x%.3f the teacher, %.2fx its MACs ratio, over "
            "constraints.max_latency_per_mac %.2f",
            trial_number,
            batch,
            row["latency_ratio"],
            value,
            limit,
        )


EXPORT_KIND = "hycomp-export"  # report.json's "kind": what marks a folder as an export hycomp wrote
EXPORT_ENTRIES = frozenset({"config.yaml", "model.pt", "model.json", "bundle", "report.json", "report.md"})


def default_target(study_folder: Path, trial_number: int, retrain: bool) -> Path:
    """Where an export goes without ``--out``: ``export/trial_<n>`` (``_retrained`` at the full budget)."""
    return study_folder / "export" / f"trial_{trial_number}{'_retrained' if retrain else ''}"


def _written_by_export(folder: Path) -> bool:
    """True when ``folder`` holds an export hycomp wrote and nothing else (so replacing it loses nothing)."""
    try:
        report = json.loads((folder / "report.json").read_text())
        entries = {entry.name for entry in folder.iterdir()}
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("kind") == EXPORT_KIND and entries <= EXPORT_ENTRIES


def check_target(target: Path, study_folder: Path, force: bool) -> None:
    """Refuse an export folder whose replacement would delete what hycomp did not write: ``--force``
    replaces an earlier export, never the study folder, a folder holding it, or anyone's other files."""
    resolved, study = target.resolve(), study_folder.resolve()
    if resolved == study or study.is_relative_to(resolved):
        raise ConfigError(
            f"--out: {str(target)!r} is the study folder or holds it; an export there would replace the study. "
            f"Pass a new folder, e.g. --out {study_folder / 'export' / 'mine'}."
        )
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not target.is_dir():
        raise ConfigError(f"--out: {str(target)!r} is a file; pass a folder that does not exist yet.")
    if not _written_by_export(target):
        raise ConfigError(
            f"--out: {str(target)!r} already exists and is not an export hycomp wrote (or holds other files); "
            "--force replaces only hycomp's own exports. Pass a new or empty folder."
        )
    if not force:
        raise ConfigError(
            f"export folder {target} already exists. Pass --force to replace that export, or --out DIR."
        )


def _loaded(cfg: SearchConfig, study_folder: Path) -> tuple[Dataset, list, dict]:
    """(data, teachers, baseline record) of this setup, loaded once per process."""
    fingerprint = stable_hash(cfg.to_dict())
    if fingerprint not in _LOADED:
        data = load_data(cfg)
        teachers, baseline = get_teachers(cfg, data, study_folder.parent, threads=cfg.measure.latency_threads)
        _LOADED[fingerprint] = (data, teachers, baseline)
    return _LOADED[fingerprint]


_LOADED: dict[str, tuple[Dataset, list, dict]] = {}


def export_context(cfg: SearchConfig, study_folder: Path) -> TrialContext:
    """The trial context of the full-budget runs: the student distils from every teacher."""
    data, teachers, _ = _loaded(cfg, study_folder)
    return TrialContext(
        cfg, data, teachers[0], study_folder, distill_from=teachers, teacher_keys=teacher_keys(cfg, data)
    )
