"""``hycomp front --remeasure``: the front's models timed again after the search, quietly (one process, one
model at a time), interleaved with the study's int8 teacher bundle as during the search, with more rounds.

Optuna does not let a finished trial's values change, so the new figures go to a sidecar file beside the study
(:data:`SIDECAR`), each with the search-time figures it replaces kept as provenance; ``front``, ``export`` and
``report`` read it (:func:`load_remeasured`) and recompute the front on the replaced latencies. A multi-expert
model's routing share and any model's latency per MAC at the throughput batch (constraints) are re-timed with
it, and a model kept off the front by those search-time figures alone is timed too: quietly it may be within.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from pipelines.deploy.routing_cost import routing_share
from pipelines.deploy.runtime import load_bundle, load_single_file
from pipelines.errors import ConfigError
from search.config import SearchConfig
from search.latency import (
    LatencyReference,
    check_resumable,
    reference_bundle,
    stored_reference,
    study_reference,
    time_against_teacher,
    time_at_batch,
    time_quietly,
)
from search.pareto import Retimed, front_numbers
from search.record import SINGLE_FILE, TrialRecord
from search.setup import load_data, trial_context
from search.study import completed_trials

__all__ = [
    "SIDECAR",
    "SIDECAR_FORMAT",
    "DEFAULT_ROUNDS",
    "remeasure_front",
    "read_sidecar",
    "load_remeasured",
]

SIDECAR = "remeasured.json"
SIDECAR_FORMAT = 1
DEFAULT_ROUNDS = 30
BATCH_ROUNDS = 15  # of 2 calls each at the throughput batch: twice the search's
log = logging.getLogger("hycomp")


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The re-timed figures of the study in ``folder`` (None when it has none)."""
    path = folder / SIDECAR
    if not path.exists():
        return None
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path}: cannot be read ({error}). Delete it, or run `hycomp front {folder} --remeasure` again."
        ) from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ConfigError(
            f"{path}: format {sidecar.get('format') if isinstance(sidecar, dict) else None!r}, this hycomp reads "
            f"{SIDECAR_FORMAT}. Delete it, or run `hycomp front {folder} --remeasure` again."
        )
    return sidecar


def _retimed(entry: dict[str, Any]) -> Retimed:
    share, per_mac = entry.get("routing_share"), entry.get("latency_per_mac")
    return Retimed(
        float(entry["latency_ms"]),
        None if share is None else float(share),
        None if per_mac is None else float(per_mac),
    )


def load_remeasured(folder: Path) -> dict[int, Retimed]:
    """{trial number: quietly re-timed figures} of the study in ``folder`` (empty when never re-timed): what
    replaces the search-time latency objective (and a multi-expert model's routing share) on the front."""
    sidecar = read_sidecar(folder)
    if sidecar is None:
        return {}
    return {int(number): _retimed(entry) for number, entry in sidecar["trials"].items()}


def _reference(cfg: SearchConfig, study: optuna.Study, folder: Path, data) -> LatencyReference:
    """The study's stored latency reference; a study made before there was one gets one now (its teachers
    are loaded from the cache to deploy the teacher bundle)."""
    reference = stored_reference(study)
    if reference is not None and (reference_bundle(folder) / "manifest.json").exists():
        check_resumable(cfg, reference, study)
        return reference
    context, _ = trial_context(cfg, data, folder)
    return study_reference(cfg, data, context.teacher, folder, study, warn_earlier=False, new_trials=False)


def _entry(
    record: TrialRecord, stats, reference: LatencyReference, rounds: int, calls_per_round: int
) -> dict[str, Any]:
    measured = record.measurement
    return {
        "latency_ms": stats.ratio * reference.teacher_median_ms,
        "latency_ratio": stats.ratio,
        "latency_ratio_min": stats.ratio_min,
        "model_ms": {"min_ms": stats.candidate.min_ms, "median_ms": stats.candidate.median_ms},
        "teacher_ms": {"min_ms": stats.reference.min_ms, "median_ms": stats.reference.median_ms},
        "rounds": rounds,
        "calls_per_round": calls_per_round,
        "search_time": {
            "latency_ms": measured.latency_ms,
            "latency_ratio": measured.latency_ratio,
            "engine": measured.engine,
            "model_median_ms": measured.latency.get("median_ms"),
            "routing_share": measured.file_routing_share,
            "latency_per_mac": measured.latency_per_mac,
        },
    }


def _time_batch(bundle, teacher, images: np.ndarray, reference: LatencyReference, measured) -> dict[str, Any]:
    """The latency per MAC re-timed at the batch the search timed it at (empty where it timed none)."""
    if measured.batch_latency is None or not measured.macs_ratio:
        return {}
    batch = int(measured.batch_latency["batch"])
    stats = time_at_batch(bundle, teacher, images, reference, batch, rounds=BATCH_ROUNDS)
    return {
        "batch_latency_ratio": stats.ratio,
        "latency_per_mac": stats.ratio / measured.macs_ratio,
        "batch_ms": {
            "batch": batch,
            "min_ms": stats.candidate.min_ms,
            "median_ms": stats.candidate.median_ms,
        },
        "teacher_batch_ms": {"min_ms": stats.reference.min_ms, "median_ms": stats.reference.median_ms},
    }


def remeasure_front(
    cfg: SearchConfig, study: optuna.Study, folder: Path, rounds: int = DEFAULT_ROUNDS
) -> list[dict[str, Any]]:
    """Re-time the front's models (and any trial that joins the front on the new figures) and write the
    sidecar. Returns one row per re-timed trial: trial, mmacs, search_ms, quiet_ms, ratio."""
    if rounds < 1:
        raise ConfigError(f"--rounds: {rounds} must be >= 1.")
    data = load_data(cfg)
    reference = _reference(cfg, study, folder, data)
    images = data.val.images[:64].numpy()
    image = images[:1]
    threads, calls = reference.threads, cfg.measure.calls_per_round
    teacher_now = time_quietly(reference_bundle(folder), reference.engine, threads, 50, image)
    teacher = load_bundle(reference_bundle(folder), threads=threads, engine=reference.engine)
    trials = {trial.number: trial for trial in completed_trials(study)}
    records = {number: TrialRecord.of(trial) for number, trial in trials.items()}
    previous = read_sidecar(folder)
    entries: dict[int, dict] = {}
    if previous is not None and (previous["engine"], previous["threads"]) == (reference.engine, threads):
        entries = {int(number): entry for number, entry in previous["trials"].items()}
    timed: set[int] = set()
    while True:  # a trial can join the front once the others' latencies change: time it too
        latency = {number: _retimed(entry) for number, entry in entries.items()}
        # A trial kept off the front by its search-time routing share or latency per MAC alone may be within
        # the limit quietly: time every trial that would be on the front if those not re-timed yet were.
        hopeful = {
            number: Retimed(trials[number].values[2], 0.0, 0.0)
            for number, record in records.items()
            if number not in entries
            and (
                record.measurement.routing_share_of == SINGLE_FILE
                or record.measurement.latency_per_mac is not None
            )
        }
        todo = sorted(
            number
            for number in front_numbers(study, {**hopeful, **latency})
            if number not in timed and not records[number].is_repeat
        )
        if not todo:
            break
        for number in todo:
            timed.add(number)
            bundle_folder = folder / "trials" / f"trial_{number}" / "bundle"
            if not (bundle_folder / "manifest.json").exists():
                log.warning("trial %d: no bundle at %s; its search-time latency stays", number, bundle_folder)
                continue
            # what the search timed: a multi-expert model's one file, else the bundle
            one_file = records[number].measurement.routing_share_of == SINGLE_FILE
            load = load_single_file if one_file else load_bundle
            bundle = load(bundle_folder, threads=threads, engine=reference.engine)
            stats, _ = time_against_teacher(
                bundle, teacher, image, reference, rounds=rounds, calls_per_round=calls, warmup=10
            )
            entries[number] = _entry(records[number], stats, reference, rounds, calls)
            if one_file:  # the routing share is a constraint of multi-expert models: re-timed too
                entries[number]["routing_share"] = routing_share(
                    bundle_folder, image, engine=reference.engine, threads=threads
                )
            entries[number].update(
                _time_batch(bundle, teacher, images, reference, records[number].measurement)
            )
            log.info(
                "trial %d: %.3f ms quiet (x%.3f teacher)", number, entries[number]["latency_ms"], stats.ratio
            )
    for number, record in records.items():  # a repeat is its original's model: same figures
        if record.is_repeat and record.repeat_of in entries:
            entries[number] = {**entries[record.repeat_of], "same_as": record.repeat_of}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "study": study.study_name,
        "engine": reference.engine,
        "version": reference.version,
        "threads": threads,
        "batch": reference.batch,
        "teacher_quiet_median_ms": reference.teacher_median_ms,  # the scale: the study's start
        "teacher_now": {"min_ms": teacher_now.min_ms, "median_ms": teacher_now.median_ms},
        "trials": {str(number): entries[number] for number in sorted(entries)},
    }
    path = folder / SIDECAR
    staging = path.with_name(f"{SIDECAR}.{os.getpid()}.partial")
    staging.write_text(json.dumps(sidecar, indent=2))
    staging.replace(path)
    return [
        {
            "trial": number,
            "mmacs": trials[number].values[1],
            "search_ms": entries[number]["search_time"]["latency_ms"],
            "quiet_ms": entries[number]["latency_ms"],
            "ratio": entries[number]["latency_ratio"],
            "search_routing_share": entries[number]["search_time"].get("routing_share"),
            "quiet_routing_share": entries[number].get("routing_share"),
            "search_latency_per_mac": entries[number]["search_time"].get("latency_per_mac"),
            "quiet_latency_per_mac": entries[number].get("latency_per_mac"),
        }
        for number in sorted(timed & set(entries))
    ]
