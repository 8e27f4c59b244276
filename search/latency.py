"""The study's latency yardstick: the teacher deployed once as an int8 bundle, the engine that runs it fastest,
and its latency timed quietly at the study's start.

A trial's model is timed interleaved with that teacher bundle on the same engine (:func:`time_against_teacher`),
so other work on the machine slows both alike and their ratio holds; the study's latency objective is that
ratio times the teacher's quiet median. The choice is stored in the study (:data:`LATENCY_KEY`), so worker
processes and resumed runs use the same engine and the same teacher figure.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import TrialState

from pipelines.deploy.block_time import block_time_shares
from pipelines.deploy.bundle import deploy_moe
from pipelines.deploy.engines import ENGINES, engine_available, engine_version
from pipelines.deploy.int8 import INT8_RECIPE
from pipelines.deploy.manifest import read_manifest
from pipelines.deploy.runtime import backend_label, load_bundle
from pipelines.errors import ConfigError, HycompError
from pipelines.moe import Gate, MixtureOfExperts
from pipelines.timing import LatencyStats, measure_interleaved, measure_latency
from search.config import AUTO, MeasureSettings, SearchConfig

__all__ = [
    "LATENCY_KEY",
    "REFERENCE_FORMAT",
    "LatencyReference",
    "check_engine",
    "candidate_engines",
    "reference_bundle",
    "deploy_reference",
    "time_quietly",
    "choose_engine",
    "stored_reference",
    "check_recipe",
    "check_resumable",
    "study_reference",
    "time_against_teacher",
    "time_at_batch",
    "BLOCK_TIME_FILE",
    "study_block_time",
    "read_block_time",
]

LATENCY_KEY = "hycomp_latency_reference"  # the study user attribute holding the LatencyReference
REFERENCE_FORMAT = 1
QUIET_WARMUP = 10
log = logging.getLogger("hycomp")


@dataclass(frozen=True)
class LatencyReference:
    """The engine a study times on and its teacher's quiet latency there (batch ``batch``, ``threads``)."""

    engine: str
    version: str
    threads: int
    batch: int
    teacher_min_ms: float
    teacher_median_ms: float
    # every engine timed at the start: {engine: {"version", "min_ms", "median_ms"}}
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how the study's int8 files are made (pipelines.deploy.int8.INT8_RECIPE); 1 for studies made before it was kept
    int8_recipe: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"format": REFERENCE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LatencyReference:
        """The reference ``data`` (from :meth:`to_dict`); ``where`` names it in the error."""
        if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else data
            raise ConfigError(
                f"{where}: latency reference format {found!r}, this hycomp reads {REFERENCE_FORMAT}. Re-run "
                "`hycomp search` into a new study name (study.name)."
            )
        values = {key: value for key, value in data.items() if key != "format"}
        names = {item.name for item in fields(cls)}
        missing, unknown = names - set(values) - {"timings", "int8_recipe"}, set(values) - names
        if missing or unknown:
            raise ConfigError(
                f"{where}: latency reference without {sorted(missing)} or with unknown {sorted(unknown)}. Re-run "
                "`hycomp search` into a new study name (study.name)."
            )
        return cls(**values)

    def summary(self) -> str:
        """One line: the chosen engine and every engine's quiet teacher latency."""
        timed = ", ".join(
            f"{name} {timing['median_ms']:.3f} ms (min {timing['min_ms']:.3f})"
            for name, timing in self.timings.items()
        )
        return (
            f"latency engine: {self.engine} {self.version} ({self.threads} thread(s), batch {self.batch}); "
            f"int8 teacher timed quietly: {timed}"
        )


def check_engine(setting: str) -> None:
    """``measure.engine`` names an engine this machine has (``auto`` needs ONNX Runtime, always installed)."""
    if setting not in (AUTO, *ENGINES):
        raise ConfigError(
            f"measure.engine: unknown value {setting!r}. Valid values: {', '.join((AUTO, *ENGINES))}."
        )
    if setting != AUTO and not engine_available(setting):
        raise ConfigError(
            f"measure.engine: {setting!r} is not installed here. Install it (`pip install {setting}`), or set "
            "measure.engine: auto (every installed engine is tried) or onnxruntime."
        )


def candidate_engines(setting: str) -> tuple[str, ...]:
    """The engines ``measure.engine`` lets the study choose from: ``auto``: every installed one."""
    check_engine(setting)
    if setting != AUTO:
        return (setting,)
    return tuple(name for name in ENGINES if engine_available(name))


def reference_bundle(study_folder: Path) -> Path:
    """Where a study keeps its teacher's int8 bundle."""
    return study_folder / "reference" / "bundle"


def deploy_reference(cfg: SearchConfig, data, teacher, study_folder: Path) -> Path:
    """Deploy ``teacher`` as a one-expert int8 bundle into the study folder (once: an existing bundle whose
    manifest reads is kept) and return its folder. Calibrated like a trial (512 train images, ``seed``)."""
    folder = reference_bundle(study_folder)
    if (folder / "manifest.json").exists():
        try:
            read_manifest(folder)
            return folder
        except HycompError:
            pass  # a damaged or partial bundle: deployed again
    moe = MixtureOfExperts(Gate(data.channels, 1, 4), [copy.deepcopy(teacher)], top_k=1).eval()
    calibration = data.train.subset(min(1.0, 512 / max(1, len(data.train))), seed=cfg.seed).images
    staging = folder.with_name("bundle.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    deploy_moe(moe, staging, calibration, int8=True, extra_manifest={"dataset": data.name, "role": "teacher"})
    if folder.exists():
        shutil.rmtree(folder)
    staging.replace(folder)
    return folder


def time_quietly(folder: Path, engine: str, threads: int, repeats: int, image: np.ndarray) -> LatencyStats:
    """Latency of the bundle in ``folder`` on ``engine`` at batch 1, alone (nothing of the study runs then)."""
    bundle = load_bundle(folder, threads=threads, engine=engine)
    return measure_latency(
        lambda: bundle(image),
        backend=backend_label(bundle),
        threads=threads,
        batch=1,
        warmup=QUIET_WARMUP,
        repeats=repeats,
    )


def quiet_repeats(settings: MeasureSettings) -> int:
    """Timed calls of the teacher at the study's start: more than a trial's, since it sets the scale."""
    return max(50, 3 * settings.latency_repeats)


Timer = Callable[[Path, str, int, int, np.ndarray], LatencyStats]


def choose_engine(
    cfg: SearchConfig, folder: Path, image: np.ndarray, timer: Timer = time_quietly
) -> LatencyReference:
    """Time the teacher bundle in ``folder`` on each engine ``measure.engine`` allows and keep the fastest
    (lowest median) at batch 1 with the study's threads."""
    settings = cfg.measure
    threads = settings.latency_threads
    stats = {
        engine: timer(folder, engine, threads, quiet_repeats(settings), image)
        for engine in candidate_engines(settings.engine)
    }
    engine = min(stats, key=lambda name: stats[name].median_ms)
    return LatencyReference(
        engine=engine,
        version=engine_version(engine) or "unknown",
        threads=threads,
        batch=1,
        teacher_min_ms=stats[engine].min_ms,
        teacher_median_ms=stats[engine].median_ms,
        timings={
            name: {"version": engine_version(name), "min_ms": item.min_ms, "median_ms": item.median_ms}
            for name, item in stats.items()
        },
        int8_recipe=INT8_RECIPE,
    )


def stored_reference(study) -> LatencyReference | None:
    """The latency reference a study holds (None for a study that has not chosen one yet)."""
    data = study.user_attrs.get(LATENCY_KEY)
    return None if data is None else LatencyReference.from_dict(data, f"study {study.study_name!r}")


def check_resumable(cfg: SearchConfig, reference: LatencyReference, study) -> None:
    """A resumed study keeps its engine and threads: its trials' latencies are on that scale."""
    settings = cfg.measure
    if settings.engine not in (AUTO, reference.engine):
        raise ConfigError(
            f"measure.engine: {settings.engine!r}, but study {study.study_name!r} times its trials on "
            f"{reference.engine!r}. Set measure.engine: {reference.engine} (or auto) to resume it, or pick another "
            "study.name."
        )
    if settings.latency_threads != reference.threads:
        raise ConfigError(
            f"measure.latency_threads: {settings.latency_threads}, but study {study.study_name!r} times its trials "
            f"with {reference.threads} thread(s). Set measure.latency_threads: {reference.threads} to resume it, "
            "or pick another study.name."
        )
    if not engine_available(reference.engine):
        raise ConfigError(
            f"measure.engine: study {study.study_name!r} times its trials on {reference.engine!r}, which is not "
            f"installed here. Install it (`pip install {reference.engine}`) to resume or re-measure this study."
        )


def check_recipe(reference: LatencyReference, study) -> None:
    """New trials of a study are deployed like its teacher was: int8 files of another recipe would be timed on
    another scale (the re-measure of its existing files is still allowed)."""
    if reference.int8_recipe != INT8_RECIPE:
        raise ConfigError(
            f"study {study.study_name!r}: its teacher and trials were deployed with int8 recipe "
            f"{reference.int8_recipe}, and this hycomp deploys recipe {INT8_RECIPE} (the image-reading stem stays "
            "fp32), so new trials would be timed on another scale. Continue in a new study (another study.name); "
            "`hycomp front --remeasure`, `export` and the reports still read this one."
        )


def study_reference(
    cfg: SearchConfig,
    data,
    teacher,
    study_folder: Path,
    study,
    timer: Timer = time_quietly,
    warn_earlier: bool = True,
    new_trials: bool = True,
) -> LatencyReference:
    """The study's latency reference: the stored one (a resumed study, a worker), or chosen now and stored.
    The teacher bundle is deployed into the study folder when missing. Logs the choice, and with
    ``warn_earlier`` warns about trials that were timed before it (alone, on another scale). ``new_trials``:
    the caller deploys new trials, which must use the study's int8 recipe (:func:`check_recipe`)."""
    folder = deploy_reference(cfg, data, teacher, study_folder)
    reference = stored_reference(study)
    if reference is not None:
        check_resumable(cfg, reference, study)
        if new_trials:
            check_recipe(reference, study)
        return reference
    image = data.val.images[:1].numpy()
    reference = choose_engine(cfg, folder, image, timer)
    study.set_user_attr(LATENCY_KEY, reference.to_dict())
    log.info(reference.summary())
    earlier = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if earlier and warn_earlier:  # a study made before trials were timed against the teacher
        log.warning(
            "study %s: its %d completed trial(s) were timed alone, not against the teacher; their latencies are "
            "on another scale. `hycomp front %s --remeasure` re-times the front on this one.",
            study.study_name,
            len(earlier),
            study_folder,
        )
    return reference


def time_against_teacher(
    bundle,
    teacher_bundle,
    image: np.ndarray,
    reference: LatencyReference,
    *,
    rounds: int,
    calls_per_round: int,
    warmup: int = 5,
):
    """Time ``bundle`` interleaved with ``teacher_bundle`` (both loaded on the reference's engine and threads)
    on ``image`` (one image, or a batch of them). Returns the interleaved statistics and the median share of
    the trial model's calls spent outside its experts (gate and routing; None for a model without a
    ``last_timing``)."""
    shares: list[float] = []

    def candidate() -> object:
        output = bundle(image)
        timing = getattr(bundle, "last_timing", None)
        if timing and timing.get("total", 0) > 0:
            shares.append(timing["gate_and_routing"] / timing["total"])
        return output

    stats = measure_interleaved(
        candidate,
        lambda: teacher_bundle(image),
        rounds=rounds,
        calls_per_round=calls_per_round,
        warmup=warmup,
        backend=(backend_label(bundle), backend_label(teacher_bundle)),
        threads=reference.threads,
        batch=len(image),
    )
    shares = shares[warmup:]  # the warm-up calls are not timed
    share = float(np.median(shares)) if shares else None
    return stats, share


def time_at_batch(
    bundle, teacher_bundle, images: np.ndarray, reference: LatencyReference, batch: int, rounds: int
):
    """:func:`time_against_teacher` at ``batch`` (``images`` repeated to fill it), in ``rounds`` short rounds of 2
    calls: the throughput-batch figure the search records and ``front --remeasure`` re-times."""
    inputs = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    stats, _ = time_against_teacher(
        bundle, teacher_bundle, inputs, reference, rounds=rounds, calls_per_round=2, warmup=2
    )
    return stats


BLOCK_TIME_FILE = "block_time.json"  # in the study folder: {engine, version, threads, batch, shares}


def study_block_time(
    cfg: SearchConfig, data, teacher, study_folder: Path, reference: LatencyReference
) -> None:
    """Measure, once per study and before any trial, each removable block's share of the int8 teacher's
    latency on the study's engine at ``measure.throughput_batch`` (batch 1 without one), and keep it in the
    study folder for every worker and resumed run. Only when the space ranks removed blocks by latency."""
    space = cfg.space
    path = study_folder / BLOCK_TIME_FILE
    if "latency" not in space.block_ranking or space.blocks_removed.high == 0 or path.exists():
        return
    batch = cfg.measure.throughput_batch or 1
    started = time.perf_counter()
    shares = block_time_shares(
        teacher, data.train.images[:128], engine=reference.engine, threads=reference.threads, batch=batch
    )
    record = {
        "engine": reference.engine,
        "version": reference.version,
        "threads": reference.threads,
        "batch": batch,
        "shares": shares,
    }
    staging = path.with_name(f"{path.name}.{os.getpid()}.partial")
    staging.write_text(json.dumps(record, indent=2))
    staging.replace(path)
    log.info(
        "block time (%s, batch %d, %.0f s): %s",
        reference.engine,
        batch,
        time.perf_counter() - started,
        ", ".join(f"{name} {share:.1%}" for name, share in shares.items()),
    )


def read_block_time(study_folder: Path) -> dict[str, float]:
    """The block shares :func:`study_block_time` kept for the study in ``study_folder``."""
    path = study_folder / BLOCK_TIME_FILE
    try:
        shares = json.loads(path.read_text())["shares"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path}: {error}. A trial with block_ranking 'latency' ranks blocks by their share of the teacher's "
            "latency, measured when the search starts: re-run `hycomp search` on this study to measure it."
        ) from None
    return {str(name): float(share) for name, share in shares.items()}
