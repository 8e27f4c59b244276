"""The Pareto front, computed once with Optuna's front function into a table; selection policies.

The front is Optuna's (constraints included: with constraints, only feasible trials are on it). This
module only turns it into a pandas table with units and picks a point from it. Latencies re-timed quietly
after the search (``hycomp front --remeasure``, :mod:`search.remeasure`) replace the search-time ones when
given (``latency``: {trial number: :class:`Retimed`}, with a multi-expert model's routing share); the front
is then recomputed on the replaced values.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import optuna
import pandas as pd
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
from optuna.trial import TrialState

from pipelines.errors import ConfigError
from pipelines.hybrid import DEFAULT_EXPERT_INIT
from pipelines.moe import DEFAULT_ROUTING
from search.latency import LatencyReference, stored_reference
from search.record import TrialRecord
from search.space import GATE_ONLY

__all__ = ["trials_table", "front_table", "failures_table", "Pick", "pick_trial", "PICKS", "Retimed"]

PICKS = ("max-accuracy", "knee", "min-latency", "min-macs")

_COLUMNS = {
    "val_accuracy": "val acc",
    "mmacs": "MMACs",
    "latency_ms": "latency ms",
    "latency_ratio": "x teacher",
    "size_kb": "size KB",
    "params": "params",
    "achieved_sparsity": "sparsity",
    "expert_init": "experts from",
    "blocks_removed": "blocks removed",
    "block_ranking": "blocks by",
    "routing_share": "routing share",
    "latency_per_mac": "latency/MACs",
}


# what a trial used for a gate setting its space did not search (pipelines' defaults)
GATE_DEFAULTS = {"routing": DEFAULT_ROUTING, "expert_init": DEFAULT_EXPERT_INIT}


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


@dataclass(frozen=True)
class Retimed:
    """A trial's figures re-timed quietly (:mod:`search.remeasure`): its latency, for a multi-expert
    ``model.onnx`` its gate + routing share, and where the search timed one its latency per MAC."""

    latency_ms: float
    routing_share: float | None = None
    latency_per_mac: float | None = None


Latencies = Mapping[int, Retimed]  # trial number -> what replaces its search-time latency (and share)


def _with_latency(trial: optuna.trial.FrozenTrial, retimed: Retimed) -> optuna.trial.FrozenTrial:
    """A copy of ``trial`` with its latency objective, and the constraints set on it, on the routing share
    and on the latency per MAC (where those were re-timed), replaced."""
    replaced = copy.deepcopy(trial)
    replaced.values = [*trial.values[:2], retimed.latency_ms]
    attrs = dict(trial.system_attrs)
    if "latency_ms" in trial.constraints:
        limit = trial.values[2] - trial.constraints["latency_ms"]  # set as latency - max_latency_ms
        attrs["constraints:latency_ms"] = retimed.latency_ms - limit
    measured = TrialRecord.of(trial).measurement
    # each set as measured value - limit: the limit is what the search-time value says it was
    for name, value in (
        ("routing_share", retimed.routing_share),
        ("latency_per_mac", retimed.latency_per_mac),
    ):
        if value is not None and name in trial.constraints:
            attrs[f"constraints:{name}"] = value - (getattr(measured, name) - trial.constraints[name])
    replaced.system_attrs = attrs
    return replaced


def completed_with_latency(study: optuna.Study, latency: Latencies | None = None) -> list:
    """The completed trials, copies with ``latency`` replacing their latency objective where given."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    latency = latency or {}
    return [
        _with_latency(trial, latency[trial.number]) if trial.number in latency else trial for trial in trials
    ]


def front_numbers(study: optuna.Study, latency: Latencies | None = None) -> set[int]:
    """The trials on the Pareto front (feasible ones only when the study has constraints), computed by
    Optuna's own front function (what ``study.best_trials`` calls) on the values with ``latency`` replaced.
    It is a private Optuna function: ``study.best_trials`` takes no replaced values."""
    trials = completed_with_latency(study, latency)
    constrained = any(trial.constraints for trial in trials)
    front = _get_pareto_front_trials_by_trials(trials, study.directions, consider_constraint=constrained)
    return {trial.number for trial in front}


def _ratio(measured, latency_ms: float, remeasured: bool, teacher_ms: float | None) -> float | None:
    """The model's latency over the teacher's behind ``latency_ms``: a latency timed against the teacher (at
    search time or re-timed) is that ratio times the teacher's quiet median, on the study's one scale."""
    if teacher_ms is None or not (remeasured or measured.latency_ratio is not None):
        return None  # timed alone (a study made before the teacher yardstick), never re-timed
    return latency_ms / teacher_ms


def _current(searched: float | None, quiet: float | None) -> float | None:
    """A figure re-timed by ``front --remeasure`` where it was, else the search's."""
    return searched if quiet is None else quiet


def trials_table(study: optuna.Study, latency: Latencies | None = None) -> pd.DataFrame:
    """Every completed trial, one row each, with its objectives, settings and front membership; ``latency``
    (re-timed quietly, :mod:`search.remeasure`) replaces the search-time latency of the trials it holds."""
    records = {trial.number: TrialRecord.of(trial) for trial in study.get_trials(deepcopy=False)}
    # A trial that reused an identical earlier trial's result (``repeat_of``) is listed, not on the front.
    front = {number for number in front_numbers(study, latency) if not records[number].is_repeat}
    yardstick = stored_reference(study)
    teacher_ms = yardstick.teacher_median_ms if yardstick is not None else None
    latency = latency or {}
    rows = []
    for trial in completed_with_latency(study, latency):
        record = records[trial.number]
        measured, training = record.measurement, record.training
        config = record.parameters(trial.params)
        gated = config.get("num_experts", 1) > 1  # a single expert runs without a gate (GATE_ONLY)
        retimed = latency.get(trial.number) or Retimed(trial.values[2])  # not re-timed: no quiet figures
        rows.append(
            {
                "trial": trial.number,
                "val_accuracy": trial.values[0],
                "mmacs": trial.values[1],
                "latency_ms": trial.values[2],
                "search_latency_ms": measured.latency_ms,
                "latency_ratio": _ratio(measured, trial.values[2], trial.number in latency, teacher_ms),
                "remeasured": trial.number in latency,
                "size_kb": measured.size_kb,
                "params": measured.params,
                "achieved_sparsity": training.achieved_sparsity,
                "pruner": config.get("pruner"),
                "sparsity": config.get("sparsity"),
                "blocks_removed": config.get("blocks_removed", 0),
                "block_ranking": config.get("block_ranking", "output"),
                "bits": config.get("bits"),
                "num_experts": config.get("num_experts"),
                "top_k": config.get("effective_top_k", config.get("top_k")),
                # without a gate, what only a gate uses means nothing
                **{key: config.get(key, GATE_DEFAULTS.get(key)) if gated else "-" for key in GATE_ONLY},
                "views": config.get("views", 1),
                # gate + routing share of model.onnx at batch 1 (multi-expert trials measured on it)
                "routing_share": _current(measured.file_routing_share, retimed.routing_share),
                # latency ratio at measure.throughput_batch over the MACs ratio (1: time falls as MACs do)
                "latency_per_mac": _current(measured.latency_per_mac, retimed.latency_per_mac),
                "throughput_batch": (measured.batch_latency or {}).get("batch"),
                "feasible": _feasible(trial),
                "on_front": trial.number in front,
                "reference": record.reference,
                "repeat_of": record.repeat_of,
                "engine": f"{measured.engine} {measured.precision or ''}".strip(),
                "latency_backend": measured.latency.get("backend", ""),
                "latency_threads": measured.latency.get("threads"),
                "seconds": record.seconds.get("total"),
            }
        )
    return pd.DataFrame(rows)


def repeat_count(table: pd.DataFrame) -> int:
    """Rows of :func:`trials_table` that reused an earlier trial's result (not counted as evaluated)."""
    return int(table["repeat_of"].notna().sum()) if not table.empty else 0


def front_table(study: optuna.Study, latency: Latencies | None = None) -> pd.DataFrame:
    """The non-dominated (and feasible) trials, best accuracy first (``latency``: as in :func:`trials_table`)."""
    table = trials_table(study, latency)
    if table.empty:
        return table
    return (
        table[table["on_front"]]
        .sort_values(["val_accuracy", "mmacs"], ascending=[False, True])
        .reset_index(drop=True)
    )


def failures_table(study: optuna.Study) -> pd.DataFrame:
    rows = [
        {"trial": trial.number, "state": trial.state.name, "reason": _reason(trial)}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL, TrialState.PRUNED))
    ]
    return pd.DataFrame(rows, columns=["trial", "state", "reason"])


def _reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why a trial failed or was pruned; a trial that recorded nothing (one started before it could)
    still gets a reason."""
    stopped = "failed" if trial.state == TrialState.FAIL else "pruned"
    return TrialRecord.of(trial).fail_reason or f"{stopped} before it recorded a reason"


@dataclass(frozen=True)
class Pick:
    trial: int
    reason: str


def pick_trial(
    study: optuna.Study,
    *,
    trial: int | None = None,
    policy: str | None = None,
    max_latency_ms: float | None = None,
    max_size_kb: float | None = None,
    max_mmacs: float | None = None,
    latency: Latencies | None = None,
) -> Pick:
    """Choose the point to export.

    - ``trial``: that trial (must be complete);
    - budgets (``max_latency_ms`` / ``max_size_kb`` / ``max_mmacs``): the most accurate front trial within them;
    - ``policy``: ``max-accuracy``, ``knee`` (front point closest to the ideal point after scaling each
      objective to [0, 1] over the front), ``min-latency`` or ``min-macs``.

    ``latency`` (re-timed latencies, :func:`trials_table`) replaces the search-time ones on the front.
    """
    completed = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if not completed:
        raise ConfigError(
            f"study {study.study_name!r} has no completed trials. Run `hycomp search` (or let it finish) first."
        )
    if trial is not None:
        if trial not in completed:
            all_numbers = sorted(t.number for t in study.trials)
            state = next((t.state.name for t in study.trials if t.number == trial), None)
            detail = (
                f"it is {state}" if state else f"trial numbers run from {all_numbers[0]} to {all_numbers[-1]}"
            )
            raise ConfigError(
                f"--trial: {trial} is not a completed trial ({detail}). Completed trials: "
                f"{', '.join(map(str, sorted(completed)))}."
            )
        return Pick(trial, f"trial {trial} chosen by --trial")
    front = _exportable_front(study, latency)
    budgets = {"latency_ms": max_latency_ms, "size_kb": max_size_kb, "mmacs": max_mmacs}
    if any(value is not None for value in budgets.values()):
        best = _within(front, budgets).iloc[0]
        return Pick(int(best["trial"]), f"most accurate front trial within {_said(budgets)}")
    policy = policy or "max-accuracy"
    if policy not in PICKS:
        raise ConfigError(f"--pick: unknown value {policy!r}. Valid values: {', '.join(PICKS)}.")
    if policy == "max-accuracy":
        best = front.sort_values(["val_accuracy", "latency_ms"], ascending=[False, True]).iloc[0]
        return Pick(int(best["trial"]), "highest validation accuracy on the front")
    if policy == "min-latency":
        best = front.sort_values(["latency_ms", "val_accuracy"], ascending=[True, False]).iloc[0]
        return Pick(int(best["trial"]), "lowest latency on the front")
    if policy == "min-macs":
        best = front.sort_values(["mmacs", "val_accuracy"], ascending=[True, False]).iloc[0]
        return Pick(int(best["trial"]), "fewest MACs on the front")
    scaled = pd.DataFrame(index=front.index)
    for column, maximize in (("val_accuracy", True), ("mmacs", False), ("latency_ms", False)):
        values = front[column].astype(float)
        span = values.max() - values.min()
        badness = (values.max() - values) if maximize else (values - values.min())
        scaled[column] = badness / span if span > 0 else 0.0
    distance = (scaled**2).sum(axis=1) ** 0.5
    best = front.loc[distance.idxmin()]
    return Pick(
        int(best["trial"]), "knee: front point closest to the ideal point (objectives scaled to [0, 1])"
    )


DISPLAY_COLUMNS = (
    "trial",
    "val_accuracy",
    "mmacs",
    "latency_ms",
    "latency_ratio",
    "size_kb",
    "sparsity",
    "blocks_removed",
    "block_ranking",
    "pruner",
    "bits",
    "num_experts",
    "top_k",
    "gate_size",
    "routing",
    "expert_init",
    "views",
    "routing_share",
    "latency_per_mac",
    "engine",
    "feasible",
)


def _percent(value) -> str:
    """A share as a percentage; "-" where none was measured (idempotent: formatted text stays)."""
    if isinstance(value, str):
        return value
    return "-" if value is None or pd.isna(value) else f"{value:.1%}"


def per_mac_note(table: pd.DataFrame) -> str:
    """What the ``latency/MACs`` column means, where the table has one (else empty)."""
    if "latency_per_mac" not in table or table["latency_per_mac"].isna().all():
        return ""
    batches = sorted({int(batch) for batch in table["throughput_batch"].dropna()})
    return (
        f"latency/MACs: the latency ratio to the int8 teacher at batch {'/'.join(map(str, batches))} over the MACs "
        "ratio (1 = time falls as MACs do; constraints.max_latency_per_mac bounds it)."
    )


def _times(value) -> str:
    """A ratio as "1.23x"; "-" where none was measured (idempotent like :func:`_percent`)."""
    if isinstance(value, str):
        return value
    return "-" if value is None or pd.isna(value) else f"{value:.2f}x"


def display_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The columns a person reads, in reading order (those the table has; ``blocks_removed`` only where a
    trial removed blocks, ``block_ranking`` only where a trial ranked them by latency, ``routing_share`` and
    ``latency_per_mac`` only where measured)."""
    columns = [column for column in DISPLAY_COLUMNS if column in table.columns]
    if "blocks_removed" in columns and not (table["blocks_removed"].fillna(0) != 0).any():
        columns.remove("blocks_removed")
    if "block_ranking" in columns and (
        "blocks_removed" not in columns or (table["block_ranking"] == "output").all()
    ):
        # nothing removed, or every trial ranked by output change (the default)
        columns.remove("block_ranking")
    for measured in ("routing_share", "latency_per_mac"):  # none measured: no multi-expert model.onnx, or
        if measured in columns and table[measured].isna().all():  # no throughput batch (older studies)
            columns.remove(measured)
    shown = table[columns].copy()
    if "routing_share" in columns:
        shown["routing_share"] = shown["routing_share"].map(_percent)
    if "latency_per_mac" in columns:
        shown["latency_per_mac"] = shown["latency_per_mac"].map(_times)
    return shown


def format_table(
    table: pd.DataFrame, baseline: dict | None = None, latency: LatencyReference | None = None
) -> str:
    """A readable terminal table with units; the baseline as a reference row when given, with the study's
    int8 teacher latency on its engine when ``latency`` is given (else torch fp32 eager)."""
    shown = display_columns(table)
    if baseline is not None:
        reference = {
            "trial": "teacher",
            "val_accuracy": baseline.get("val_accuracy"),
            "mmacs": baseline.get("macs", 0) / 1e6,
            "latency_ms": (baseline.get("latency") or {}).get("median_ms"),
            "latency_ratio": None,
            "size_kb": baseline.get("size_bytes_fp32", 0) / 1024,
            "sparsity": 0.0,
            "blocks_removed": 0,
            "block_ranking": "-",
            "pruner": "-",
            "bits": 32,
            "num_experts": 1,
            "top_k": 1,
            "gate_size": "-",
            "routing": "-",
            "expert_init": "-",
            "views": 1,
            "routing_share": "-",
            "latency_per_mac": "1.00x",
            "engine": "torch",
            "feasible": "",
        }
        for column in ("blocks_removed", "block_ranking", "routing_share", "latency_per_mac"):
            if column not in shown.columns:
                del reference[column]
        if latency is not None:  # the yardstick the trials were timed against
            reference.update(
                latency_ms=latency.teacher_median_ms, latency_ratio=1.0, engine=f"{latency.engine} int8"
            )
        shown = pd.concat([shown, pd.DataFrame([reference])], ignore_index=True)
    shown = shown.rename(columns={**_COLUMNS, "num_experts": "experts"})
    return shown.to_string(index=False, float_format=lambda value: f"{value:.4g}")


def empty_front_reason(study: optuna.Study, latency: Latencies | None = None) -> str:
    """Why no completed trial is feasible, and what to do: each constraint the trials broke, how many broke
    it and how close the closest came (``latency``: re-timed figures, as in :func:`trials_table`)."""
    return (
        f"no completed trial satisfies the constraints{_violations(completed_with_latency(study, latency))}. "
        "Relax them (the flags and constraints.* of `hycomp search`) and search into a new study name: a "
        "trial's constraints are fixed when it runs."
    )


def _violations(trials: list) -> str:
    """The constraints ``trials`` broke (each recorded as value - limit), as
    ``(<name>: <n> of <m> trials over, the closest <x> over; ...)``; empty when none."""
    parts = []
    for name in sorted({name for trial in trials for name in trial.constraints}):
        excess = [trial.constraints[name] for trial in trials if name in trial.constraints]
        over = [value for value in excess if value > 0]
        if over:
            parts.append(
                f"{name}: {len(over)} of {len(excess)} trials over, the closest {min(over):.4g} over"
            )
    return f" ({'; '.join(parts)})" if parts else ""


def _exportable_front(study: optuna.Study, latency: Latencies | None = None) -> pd.DataFrame:
    front = front_table(study, latency)
    if front.empty:
        raise ConfigError(f"the Pareto front is empty: {empty_front_reason(study, latency)}")
    # The enqueued uncompressed reference is on the front by construction; it is not a result to export.
    compressed = front[front["reference"] == ""]
    return compressed if not compressed.empty else front


def _exportable_others(study: optuna.Study, latency: Latencies | None = None) -> pd.DataFrame:
    """Completed trials off the front that could still be exported: feasible, compressed, not a repeat."""
    table = trials_table(study, latency)
    keep = ~table["on_front"] & table["feasible"] & (table["reference"] == "") & table["repeat_of"].isna()
    return table[keep]


def _said(budgets: dict) -> str:
    return ", ".join(f"{key} <= {value}" for key, value in budgets.items() if value is not None)


def _within(front: pd.DataFrame, budgets: dict) -> pd.DataFrame:
    """The trials of ``front`` within every given budget, most accurate first (faster first among equals)."""
    within = front
    for column, limit in budgets.items():
        if limit is not None:
            within = within[within[column] <= limit]
    if within.empty:
        raise ConfigError(
            f"no front trial meets {_said(budgets)}. The smallest on the front: latency "
            f"{front['latency_ms'].min():.3f} ms, size {front['size_kb'].min():.1f} KB, "
            f"{front['mmacs'].min():.2f} MMACs. Loosen the budget."
        )
    return within.sort_values(["val_accuracy", "latency_ms"], ascending=[False, True])


def pick_candidates(
    study: optuna.Study,
    count: int,
    *,
    max_latency_ms: float | None = None,
    max_size_kb: float | None = None,
    max_mmacs: float | None = None,
    latency: Latencies | None = None,
) -> list[Pick]:
    """The ``count`` most accurate trials within the budgets (the front's, most accurate first, without
    budgets): the candidates that ``hycomp export --candidates`` retrains at the full budget before choosing
    one. Trials are ranked on the cheap trial budget, which can misrank them (a sparser net recovers more
    with more epochs), so the next few are worth a full-budget look. With a budget, latency, size and MACs
    are limits, not objectives: the runners-up are the next most accurate feasible trials inside it, on the
    front or not (a model with 2 test-time views is dominated by its 1-view self in latency and MACs, yet
    may be the most accurate one that fits). The first candidate is the front's best within the budget."""
    if count < 1:
        raise ConfigError(f"--candidates: {count} must be at least 1.")
    budgets = {"latency_ms": max_latency_ms, "size_kb": max_size_kb, "mmacs": max_mmacs}
    budgeted = any(value is not None for value in budgets.values())
    pool = _exportable_front(study, latency)
    if budgeted:  # the budgets are the constraints now: rank every feasible trial inside them
        pool = pd.concat([pool, _exportable_others(study, latency)], ignore_index=True)
    within = _within(pool, budgets)
    where = f"within {_said(budgets)}" if budgeted else "on the front"
    return [
        Pick(
            int(row["trial"]),
            f"candidate {rank + 1} of the {min(count, len(within))} most accurate trials {where}",
        )
        for rank, (_, row) in enumerate(within.head(count).iterrows())
    ]
