"""The search space as Optuna suggestions: one trial's configuration from the validated :class:`Space`.

Numbers stay numeric (``suggest_float(low, high, step)``) so samplers see their order; the reference trial
(no pruning, fp32, one expert) is :func:`baseline_params`.
"""

from __future__ import annotations

from typing import Any

from pipelines.hybrid import DEFAULT_EXPERT_INIT
from pipelines.moe import DEFAULT_EXPERT_TRAINING, DEFAULT_LAYOUT
from search.config import IntRange, Space
from search.record import TrialRecord

__all__ = ["NO_DEPTH", "GATE_ONLY", "INFERENCE_ONLY", "REFERENCE_BITS", "suggest", "baseline_params"]

GATE_ONLY = ("gate_size", "routing", "expert_init")  # parameters a single expert (no gate) ignores
INFERENCE_ONLY = ("views",)  # parameters that change inference only: a trained model is measured again
REFERENCE_BITS = 32
NO_DEPTH = IntRange(0, 0)  # a space without blocks_removed adds no parameter: older studies still match
DEFAULT_RANKING = ("output",)  # space.block_ranking: removed blocks ranked by output change alone


def suggest(trial: Any, space: Space) -> dict:
    """Sample one configuration. ``top_k`` is drawn from its own fixed range and then clipped to the
    sampled number of experts (a fixed range keeps the samplers' model of the space consistent); the
    value actually used is recorded as ``effective_top_k``.

    The enqueued reference trial (user attribute ``reference``) may hold values outside the space
    (sparsity 0, fp32): Optuna accepts fixed numeric values out of range, but not categorical values
    outside their choices, so a reference bit-width outside ``space.bits`` is used without suggesting it.
    """
    sparsity = space.sparsity
    params = {
        # rounded: a stepped float comes back as e.g. 0.6000000000000001, which reports would show
        "sparsity": round(
            trial.suggest_float("sparsity", sparsity.low, sparsity.high, step=sparsity.step), 6
        ),
        "pruner": trial.suggest_categorical("pruner", list(space.pruner)),
    }
    if TrialRecord.of(trial).reference and REFERENCE_BITS not in space.bits:
        params["bits"] = REFERENCE_BITS
    else:
        params["bits"] = trial.suggest_categorical("bits", list(space.bits))
    params["quantizer"] = trial.suggest_categorical("quantizer", list(space.quantizer))
    params["num_experts"] = trial.suggest_int(
        "num_experts", space.num_experts.low, space.num_experts.high, step=space.num_experts.step
    )
    params["top_k"] = trial.suggest_int("top_k", space.top_k.low, space.top_k.high, step=space.top_k.step)
    params["gate_size"] = trial.suggest_categorical("gate_size", list(space.gate_size))
    params["routing"] = trial.suggest_categorical("routing", list(space.routing))
    if space.expert_init != (
        DEFAULT_EXPERT_INIT,
    ):  # a one-choice space adds no parameter: older studies still match
        params["expert_init"] = trial.suggest_categorical("expert_init", list(space.expert_init))
    if space.views != (1,):
        params["views"] = trial.suggest_categorical("views", list(space.views))
    if space.blocks_removed != NO_DEPTH:
        depth = space.blocks_removed
        params["blocks_removed"] = trial.suggest_int("blocks_removed", depth.low, depth.high, step=depth.step)
    if space.block_ranking != DEFAULT_RANKING:  # a one-choice default adds no parameter
        params["block_ranking"] = trial.suggest_categorical("block_ranking", list(space.block_ranking))
    if space.layout != (DEFAULT_LAYOUT,):  # a one-choice space adds no parameter: older studies still match
        params["layout"] = trial.suggest_categorical("layout", list(space.layout))
    if params.get("layout") == "shared":  # where the experts start matters to the shared layout only
        split = space.split_at
        params["split_at"] = trial.suggest_int("split_at", split.low, split.high, step=split.step)
    if space.expert_training != (DEFAULT_EXPERT_TRAINING,):  # a one-choice default adds no parameter
        params["expert_training"] = trial.suggest_categorical("expert_training", list(space.expert_training))
    params["effective_top_k"] = min(params["top_k"], params["num_experts"])
    return params


def baseline_params(space: Space) -> dict:
    """The uncompressed reference point enqueued first: no pruning, no removed blocks, fp32 weights, one
    expert."""
    params = {
        "sparsity": 0.0,
        "pruner": space.pruner[0],
        "bits": REFERENCE_BITS,
        "num_experts": 1,
        "top_k": 1,
        "gate_size": min(space.gate_size),
        "routing": space.routing[0],
        "quantizer": space.quantizer[0],
    }
    if space.expert_init != (DEFAULT_EXPERT_INIT,):
        params["expert_init"] = space.expert_init[0]
    if space.views != (1,):
        params["views"] = min(space.views)
    if space.blocks_removed != NO_DEPTH:
        params["blocks_removed"] = 0
    if space.block_ranking != DEFAULT_RANKING:
        params["block_ranking"] = space.block_ranking[0]
    if space.layout != (DEFAULT_LAYOUT,):
        params["layout"] = space.layout[0]
        if params["layout"] == "shared":
            params["split_at"] = space.split_at.low
    if space.expert_training != (DEFAULT_EXPERT_TRAINING,):
        params["expert_training"] = space.expert_training[0]
    if REFERENCE_BITS not in space.bits:
        del params["bits"]  # not a valid categorical choice: suggest() fills it in for the reference
    return params
