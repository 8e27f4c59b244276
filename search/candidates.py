"""The second rung of the multi-fidelity search: the few most accurate front trials within a budget are
retrained at the full export budget (in parallel processes, each model trained once and kept), and the
one with the best full-budget VALIDATION accuracy is exported. The cheap trial budget ranks sparse nets
too low; this rung corrects that ranking before anything is exported. Candidates are kept in
``export/candidates/trial_<n>/``; a re-run reuses those with the same configuration and setup."""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path

import optuna

from search.config import SearchConfig
from search.evaluation import measure, train_model
from search.export import check_target, default_target, export_context, export_trial
from search.model_cache import ModelCache, model_key
from search.pool import run_pinned
from search.progress import Units
from search.record import RECORD_VERSION, TrialRecord

__all__ = ["export_best", "find_candidate"]

log = logging.getLogger("hycomp")


def _retrain_candidates(
    cfg: SearchConfig, study_folder: Path, members: list[tuple[int, dict, Path]]
) -> dict[int, TrialRecord]:
    """Candidates that share one model (they differ in test-time views only, :func:`model_key`) at the full
    export budget: the model is trained once (kept in ``export/models``) and measured with each candidate's
    own views. Runs in a worker process with ``jobs`` > 1. A candidate already there with the same
    configuration and setup is reused, not measured again. Returns {trial: record}."""
    fingerprint = export_context(cfg, study_folder).setup()
    models = ModelCache(study_folder / "export" / "models")
    records: dict[int, TrialRecord] = {}
    for trial_number, params, folder in members:
        saved = _saved_candidate(folder, params, fingerprint)
        if saved is not None:
            log.info("candidate trial %d: reusing its full-budget result in %s", trial_number, folder)
            records[trial_number] = saved
            continue
        started = time.perf_counter()
        context = export_context(cfg, study_folder)
        key = model_key(params, cfg.export, cfg.seed, fingerprint)
        model, trained = models.get_or_train(
            key,
            partial(train_model, context, params, cfg.export, cfg.seed, f"candidate trial {trial_number}"),
        )
        if not trained:
            log.info(
                "candidate trial %d: the shared full-budget model with its test-time views", trial_number
            )
        measurement, seconds = measure(context, params, model, folder)
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
    fingerprint = export_context(cfg, study_folder).setup()
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
    context = export_context(cfg, study_folder)
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
