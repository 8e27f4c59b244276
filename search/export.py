"""Export: materialize one point of the front into results/<study>/export/trial_<n>/.

Written there:
  config.yaml            the resolved search config plus the trial's parameters
  model.pt / model.json  the compressed MoE (state_dict, weights_only) + what rebuilds it, with its sha256
  bundle/                the deployable ONNX Runtime bundle (gate + experts, int8 unless 32-bit) + manifest
  report.md / .json      TEST accuracy, MACs, size, latency beside the baseline's, measured in this run

Export reloads what it wrote and checks that it reproduces the trial's validation accuracy.
With ``retrain=True`` the configuration is compressed again at the full export budget (multi-fidelity:
trials are cheap, the exported point is not); its validation accuracy is then reported beside the trial's.

:func:`export_best` is the second rung of that multi-fidelity search: the few most accurate front trials
within a budget are each retrained at the full budget (in parallel processes), and the one with the best
full-budget VALIDATION accuracy is exported. The cheap trial budget ranks sparse nets too low (they
recover more with more epochs); this rung corrects that ranking before anything is exported.
Candidates are kept in ``export/candidates/trial_<n>/``; a re-run reuses those with the same configuration
and setup.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import optuna
import yaml

from pipelines.data import Dataset
from pipelines.deploy.bundle import agreement
from pipelines.deploy.int8 import quantize_onnx_int8
from pipelines.deploy.manifest import Manifest
from pipelines.deploy.onnx import export_onnx
from pipelines.deploy.runtime import OrtModel, load_bundle, measure_moe_latency
from pipelines.errors import ConfigError, HycompError
from pipelines.measure import torch_runner
from pipelines.moe import rebuild_moe
from pipelines.serialize import load_checkpoint
from pipelines.timing import measure_latency
from pipelines.train import evaluate
from search.config import SearchConfig, stable_hash
from search.evaluation import TrialContext, measure, train_and_measure, train_model
from search.model_cache import ModelCache, model_key
from search.pool import run_pinned
from search.progress import Units
from search.record import RECORD_VERSION, TrialRecord
from search.setup import get_teachers, load_data, teacher_keys

__all__ = ["export_trial", "export_best", "find_candidate", "bundle_accuracy"]

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
                _context(cfg, study_folder),
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
                "agreement_with_torch": agreement(moe, bundle, data.val.images),  # the whole val split
                "engine_weight_grid": _weight_grid_totals(bundle.manifest),
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


def _context(cfg: SearchConfig, study_folder: Path) -> TrialContext:
    """The trial context of the full-budget runs: the student distils from every teacher."""
    data, teachers, _ = _loaded(cfg, study_folder)
    return TrialContext(
        cfg, data, teachers[0], study_folder, distill_from=teachers, teacher_keys=teacher_keys(cfg, data)
    )


def _retrain_candidates(
    cfg: SearchConfig, study_folder: Path, members: list[tuple[int, dict, Path]]
) -> dict[int, TrialRecord]:
    """Candidates that share one model (they differ in test-time views only, :func:`model_key`) at the full
    export budget: the model is trained once (kept in ``export/models``) and measured with each candidate's
    own views. Runs in a worker process with ``jobs`` > 1. A candidate already there with the same
    configuration and setup is reused, not measured again. Returns {trial: record}."""
    fingerprint = _context(cfg, study_folder).setup()
    models = ModelCache(study_folder / "export" / "models")
    records: dict[int, TrialRecord] = {}
    for trial_number, params, folder in members:
        saved = _saved_candidate(folder, params, fingerprint)
        if saved is not None:
            log.info("candidate trial %d: reusing its full-budget result in %s", trial_number, folder)
            records[trial_number] = saved
            continue
        started = time.perf_counter()
        context = _context(cfg, study_folder)
        key = model_key(params, cfg.export, cfg.seed, fingerprint)
        model, trained = models.get_or_train(
            key,
            partial(train_model, context, params, cfg.export, cfg.seed, f"candidate trial {trial_number}"),
        )
        if not trained:
            log.info(
                "candidate trial %d: the shared full-budget model with its test-time views", trial_number
            )
        measurement, seconds = measure(
            context,
            params,
            model,
            folder,
            seed=cfg.seed,
            threads=cfg.measure.latency_threads,
            repeats=cfg.measure.latency_repeats,
        )
        record = TrialRecord(
            config=params,
            model=key,
            trained=trained,
            training=model.training,
            measurement=measurement,
            seconds={**model.seconds, **seconds, "total": time.perf_counter() - started},
        )
        saved = {"trial": trial_number, "params": params, "setup": fingerprint, "record": record.to_dict()}
        staging = (folder / "candidate.json").with_suffix(".tmp")
        staging.write_text(json.dumps(saved, indent=1, default=str))
        staging.replace(folder / "candidate.json")  # written last: a folder without it is retrained
        records[trial_number] = record
    return records


def _saved_candidate(folder: Path, params: dict, fingerprint: str) -> TrialRecord | None:
    """The record of a finished candidate in ``folder`` with ``params`` under this setup; None if there is
    none (or it was written by another hycomp: then it is computed again)."""
    record_path = folder / "candidate.json"
    if not (record_path.exists() and (folder / "model.json").exists() and (folder / "bundle").exists()):
        return None
    saved = json.loads(record_path.read_text())
    if saved.get("params") != params or saved.get("setup") != fingerprint:
        return None
    if (saved.get("record") or {}).get("version") != RECORD_VERSION:
        return None
    return TrialRecord.from_dict(saved["record"], str(record_path))


def find_candidate(cfg: SearchConfig, study_folder: Path, params: dict) -> tuple[Path, TrialRecord] | None:
    """(folder, record) of a candidate that ``export --candidates`` already retrained at the full budget
    with exactly ``params`` under this setup, at seed ``cfg.seed``; None if there is none."""
    fingerprint = _context(cfg, study_folder).setup()
    for record_path in sorted((study_folder / "export" / "candidates").glob("trial_*/candidate.json")):
        saved = _saved_candidate(record_path.parent, params, fingerprint)
        if saved is not None:
            return record_path.parent, saved
    return None


def export_best(
    cfg: SearchConfig,
    study: optuna.Study,
    study_folder: Path,
    picks: list,
    *,
    jobs: int = 1,
    force: bool = False,
    out: Path | None = None,
) -> dict:
    """Retrain every candidate (:func:`search.pareto.pick_candidates`) at the full budget, ``jobs`` at a
    time, and export the one with the best full-budget validation accuracy (fewer MACs among equals).
    The test split is read only for the exported one. Returns its report."""
    for pick in picks:  # before any retraining: a refused target must not cost minutes
        check_target(out or default_target(study_folder, pick.trial, True), study_folder, force)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    folder = study_folder / "export" / "candidates"
    context = _context(cfg, study_folder)
    fingerprint = context.setup()
    context.training_data(cfg.export)  # here, once: the retraining processes load the kept targets
    groups: dict[str, list[tuple[int, dict, Path]]] = {}  # one training per model (views differ only)
    for pick in picks:
        params = TrialRecord.of(trials[pick.trial]).parameters(trials[pick.trial].params)
        key = model_key(params, cfg.export, cfg.seed, fingerprint)
        groups.setdefault(key, []).append((pick.trial, params, folder / f"trial_{pick.trial}"))
    work = [(cfg, study_folder, members) for members in groups.values()]
    records: dict[int, TrialRecord] = {}
    units = Units("export", len(work), "model")  # the command has already said which trials are retrained

    def finished(job: tuple, result: dict) -> None:
        records.update(result)
        units.finished(
            "; ".join(
                f"candidate trial {number} at the full budget: val {record.measurement.val_accuracy:.4f}, "
                f"{record.measurement.mmacs:.3f} MMACs"
                for number, record in result.items()
            )
        )

    try:
        run_pinned(_retrain_candidates, work, jobs, finished)
    finally:
        units.close()
    rows = [
        {
            "trial": pick.trial,
            "params": records[pick.trial].config,
            "trial_val_accuracy": trials[pick.trial].values[0],
            "full_budget_val_accuracy": records[pick.trial].measurement.val_accuracy,
            "mmacs": records[pick.trial].measurement.mmacs,
            "latency_ms": records[pick.trial].measurement.latency_ms,
        }
        for pick in picks
    ]
    best = max(rows, key=lambda row: (row["full_budget_val_accuracy"], -row["mmacs"]))
    number = best["trial"]
    reason = f"best full-budget validation accuracy of {len(rows)} candidates ({picks[0].reason.split(' of the ', 1)[-1]})"
    return export_trial(
        cfg,
        study,
        study_folder,
        number,
        reason=reason,
        retrain=True,
        force=force,
        out=out,
        prepared=(folder / f"trial_{number}", records[number]),
        candidates=rows,
    )


def _weight_grid_totals(manifest: Manifest | None) -> dict[str, int] | None:
    """Weight tensors the int8 engine holds exactly on NNI's grid / rounds to its own, over all files."""
    per_file = manifest.weight_grid if manifest is not None else {}
    if not per_file:
        return None
    return {key: sum(counts.get(key, 0) for counts in per_file.values()) for key in ("exact", "rounded")}


def _latency_cell(stats: dict) -> str:
    return f"{stats['median_ms']:.3f} ms (p10 {stats['p10_ms']:.3f}, p90 {stats['p90_ms']:.3f})"


def _weight_grid_line(totals: dict[str, int] | None) -> list[str]:
    if not totals:
        return []
    return [
        f"- int8 engine weights: {totals['exact']} tensors hold NNI's levels exactly, {totals['rounded']} are "
        "rounded to the engine's [-64, 64] grid (8-bit or fp32 weights: more levels than it holds)."
    ]


def _ensemble_row(baseline: dict) -> list[str]:
    ensemble = baseline.get("ensemble")
    if not ensemble:
        return []
    return [
        f"| teacher ensemble ({len(ensemble['members'])} x {baseline['arch']} fp32, distillation source only) | "
        f"{ensemble['test_accuracy']:.4f} | {ensemble['val_accuracy']:.4f} | {ensemble['macs'] / 1e6:.3f} | | | |"
    ]


def _candidate_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "Candidates retrained at the full budget (chosen on full-budget validation accuracy; the trial column "
        "is the cheap trial budget's):",
        "",
        "| trial | configuration | trial val | full-budget val | MMACs | latency ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        params = row["params"]
        described = (
            f"{params.get('pruner')} {params.get('sparsity')}, {params.get('bits')}-bit, "
            f"{params.get('num_experts')} expert(s) top-{params.get('effective_top_k', params.get('top_k'))}"
            + (
                f", experts from {params['expert_init']}"
                if params.get("num_experts", 1) > 1 and "expert_init" in params
                else ""
            )
            + (f", {params['views']} test-time views" if params.get("views", 1) > 1 else "")
        )
        lines.append(
            f"| {row['trial']} | {described} | {row['trial_val_accuracy']:.4f} | "
            f"{row['full_budget_val_accuracy']:.4f} | {row['mmacs']:.2f} | {row['latency_ms']:.3f} |"
        )
    return [*lines, ""]


def _views_line(params: dict) -> list[str]:
    views = int(params.get("views", 1))
    if views == 1:
        return []
    return [
        f"- Test-time views: each input runs as {views} symmetric views (identity, then flips) whose logits are "
        f"averaged; MACs, latency and accuracy above include all {views} passes (the bundle's manifest holds "
        "`views`, and `hycomp predict` runs them)."
    ]


def render_report(report: dict) -> str:
    exported, baseline = report["exported"], report["baseline"]
    latency = exported["latency"]["latency"]
    base_latency = baseline["latency"]
    lines = [
        f"# hycomp export: study `{report['study']}`, trial {report['trial']}",
        "",
        f"Picked because: {report['picked_because']}. Retrained at full budget: {report['retrained_at_full_budget']}.",
        "",
        f"Parameters: `{report['params']}`",
        "",
        "| model | test acc | val acc | MMACs / input | size KB | latency (batch 1) | backend |",
        "|---|---|---|---|---|---|---|",
        f"| baseline {baseline['arch']} fp32 | {baseline['test_accuracy']:.4f} | {baseline['val_accuracy']:.4f} | "
        f"{baseline['mmacs']:.3f} | {baseline['size_kb_fp32']:.1f} | {_latency_cell(base_latency['torch-fp32-eager'])} | torch fp32 eager |",
        f"| baseline {baseline['arch']} | | | {baseline['mmacs']:.3f} | | {_latency_cell(base_latency['onnxruntime-fp32'])} | onnxruntime fp32 |",
        f"| baseline {baseline['arch']} | | | {baseline['mmacs']:.3f} | | {_latency_cell(base_latency['onnxruntime-int8'])} | onnxruntime int8 |",
        *_ensemble_row(baseline),
        f"| **exported MoE** ({exported['precision']}, {exported['bits']}-bit weights) | **{exported['test_accuracy']:.4f}** | "
        f"{exported['val_accuracy']:.4f} | {exported['mmacs']:.3f} | {exported['size_kb']:.1f} | {_latency_cell(latency)} | {latency['backend']} |",
        "",
        f"Threads: {latency['threads']}. Versions: {latency['versions']}.",
        "",
        f"- Latency ratio to the torch fp32 baseline: {latency['median_ms'] / base_latency['torch-fp32-eager']['median_ms']:.3f}x; "
        f"gate + routing share of MoE latency: {exported['latency']['routing_share']:.1%}.",
        f"- Batch 64: {_latency_cell(exported['latency_batch64']['latency'])} per batch.",
        f"- Torch model of the export: test {exported['test_accuracy_torch']:.4f}, val {exported['val_accuracy_torch']:.4f}; "
        f"engine vs torch top-1 agreement on the whole val split {exported['agreement_with_torch']['top1_agreement']:.4f}, "
        f"max |logit diff| {exported['agreement_with_torch']['max_abs_diff']:.4g}.",
        *_weight_grid_line(exported.get("engine_weight_grid")),
        f"- MACs: {report['conventions']['macs']}. Size: {report['conventions']['size']}. {report['conventions']['low_bit']}.",
        *_views_line(report["params"]),
        "",
        *_candidate_lines(report.get("candidates") or []),
        "Routing (validation, first choice): rows are classes, columns experts.",
        "",
    ]
    lines += routing_lines(exported.get("routing_per_class") or [], report["class_names"])
    lines.append("")
    return "\n".join(lines)


def routing_lines(table: list[list[int]], class_names: list[str]) -> list[str]:
    """A routing count table (rows: classes, columns: experts; ``routing_per_class`` of a trial record)
    as markdown lines; none when there is no table."""
    if not table:
        return []
    lines = ["| class | " + " | ".join(f"expert {index}" for index in range(len(table[0]))) + " |"]
    lines.append("|---" * (len(table[0]) + 1) + "|")
    for name, row in zip(class_names, table, strict=False):
        lines.append(f"| {name[:40]} | " + " | ".join(str(value) for value in row) + " |")
    return lines
