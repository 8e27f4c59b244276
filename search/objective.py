"""One trial: sample a configuration, compress, deploy to ONNX Runtime, measure, return the objectives.

Objectives (a true multi-objective study, not a weighted sum):
  val_accuracy (maximize)  top-1 on the validation split, of the deployed engine (int8 ONNX Runtime)
  mmacs        (minimize)  millions of MACs per input actually executed: gate + top_k experts
  latency_ms   (minimize)  median batch-1 latency of the deployed engine (harness: pipelines.measure)
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset
from pipelines.deploy import agreement, deploy_moe, load_bundle, measure_moe_latency
from pipelines.errors import CompressionError
from pipelines.hybrid import HybridConfig, StageBudget, compress_hybrid
from pipelines.measure import count_macs, count_params, packed_size_bytes
from pipelines.moe import Gate, MixtureOfExperts, MoEConfig, moe_description, rebuild_moe, routing_table
from pipelines.serialize import load_checkpoint, save_checkpoint
from pipelines.train import TrainConfig, ensemble_logits, evaluate
from search.space import GATE_ONLY, INFERENCE_ONLY, Budget, SearchConfig, suggest

__all__ = [
    "OBJECTIVES",
    "DIRECTIONS",
    "TrialContext",
    "stage_budget",
    "hybrid_config",
    "evaluate_config",
    "Objective",
]

OBJECTIVES = ("val_accuracy", "mmacs", "latency_ms")
DIRECTIONS = ("maximize", "minimize", "minimize")

log = logging.getLogger("hycomp")


@dataclass
class TrialContext:
    cfg: SearchConfig
    data: Dataset
    teacher: nn.Module  # the fp32 model that is compressed (pruned into the experts)
    study_folder: Path
    distill_from: list[nn.Module] | None = None  # every teacher of ``kd_targets: ensemble``; None: [teacher]
    _ensembles: dict[str, Dataset] = field(default_factory=dict, repr=False)

    def training_data(self, budget: Budget) -> Dataset:
        """The dataset a budget trains on. With ``kd_targets: ensemble`` its train split carries the
        teachers' logits averaged over the symmetries of ``budget.augment`` and over the teachers (computed
        once per process, about a minute per teacher for BloodMNIST on 2 cores), which the students distil
        from instead of running a teacher at each step."""
        if budget.kd_targets == "online":
            return self.data
        if budget.augment not in self._ensembles:
            started = time.perf_counter()
            teachers = self.distill_from or [self.teacher]
            logits = torch.stack(
                [ensemble_logits(teacher, self.data.train, budget.augment) for teacher in teachers]
            ).mean(dim=0)
            self._ensembles[budget.augment] = replace(
                self.data, train=self.data.train.with_teacher_logits(logits)
            )
            log.info(
                "distillation targets: %d teacher(s) averaged over the %s views of the train split (%.0f s)",
                len(teachers),
                budget.augment,
                time.perf_counter() - started,
            )
        return self._ensembles[budget.augment]


def stage_budget(budget: Budget, seed: int) -> StageBudget:
    return StageBudget(
        finetune_epochs=budget.finetune_epochs,
        gate_epochs=budget.gate_epochs,
        moe_epochs=budget.moe_epochs,
        qat_epochs=budget.qat_epochs,
        train=TrainConfig(
            lr=budget.lr,
            batch_size=budget.batch_size,
            kd_alpha=budget.kd_alpha,
            kd_temperature=budget.kd_temperature,
            label_smoothing=budget.label_smoothing,
            augment=budget.augment,
            subset=budget.subset,
            seed=seed,
            precision=budget.precision,
        ),
    )


def hybrid_config(params: dict, channel_multiple: int = 8) -> HybridConfig:
    return HybridConfig(
        prune=PruneConfig(
            sparsity=float(params["sparsity"]), pruner=params["pruner"], channel_multiple=channel_multiple
        ),
        quantize=QuantizeConfig(bits=int(params["bits"]), method=params.get("quantizer", "qat")),
        moe=MoEConfig(
            num_experts=int(params["num_experts"]),
            top_k=min(int(params["top_k"]), int(params["num_experts"])),
            gate_size=int(params["gate_size"]),
            routing=params.get("routing", "class-groups"),
            views=int(params.get("views", 1)),  # trials of studies before this parameter: one view
        ),
        expert_init=params.get("expert_init", "copies"),  # trials of studies before this parameter: copies
    )


def estimate_cost(ctx: TrialContext, params: dict) -> dict:
    """MACs and packed size of a configuration before any training (prune + speedup only, ~1 s)."""
    from pipelines.compress.prune import prune

    cfg = hybrid_config(params, ctx.cfg.model.channel_multiple)
    example = ctx.data.val.images[:2]
    expert = prune(ctx.teacher, cfg.prune, example).model
    bits = cfg.quantize.bits
    expert_macs, gate_macs = count_macs(expert, example), 0
    size = cfg.moe.num_experts * packed_size_bytes(expert, bits)
    if cfg.moe.num_experts > 1:  # a one-expert MoE skips its gate
        gate = Gate(ctx.data.channels, cfg.moe.num_experts, cfg.moe.gate_size)
        gate_macs = count_macs(gate, example)
        size += packed_size_bytes(gate, min(bits, 8) if bits < 32 else 32)
    per_view = gate_macs + cfg.moe.top_k * expert_macs
    return {"mmacs": cfg.moe.views * per_view / 1e6, "size_kb": size / 1024}


def evaluate_config(
    ctx: TrialContext, params: dict, budget: Budget, folder: Path, seed: int, threads: int, repeats: int
) -> dict:
    """Compress with ``params``, write the checkpoint and ONNX bundle to ``folder``, measure everything.

    Returns a flat record (JSON-able) that becomes the trial's user attributes.
    """
    data = ctx.training_data(budget)
    hybrid = hybrid_config(params, ctx.cfg.model.channel_multiple)
    result = compress_hybrid(
        ctx.teacher, data, hybrid, stage_budget(budget, seed), seed=seed, sources=ctx.distill_from
    )
    record = _measure(ctx, params, result.moe, result.bits_by_layer, folder, seed, threads, repeats)
    record["seconds"] = {**result.seconds, **record["seconds"]}
    record.update(
        expert_params=result.expert_params,
        achieved_sparsity=result.achieved_sparsity,
        class_assignment=result.class_assignment,
        stage_val_accuracy=result.stage_accuracy,
    )
    return record


TRAINING_RECORD = ("expert_params", "achieved_sparsity", "class_assignment", "stage_val_accuracy")


def evaluate_views(
    ctx: TrialContext,
    params: dict,
    trained: dict,
    source: Path,
    folder: Path,
    seed: int,
    threads: int,
    repeats: int,
) -> dict:
    """The model trained for another trial (checkpoint ``source``, record ``trained``) measured again with
    ``params["views"]`` test-time views: the views change inference only, so nothing is trained again."""
    description, layers, state = load_checkpoint(source)
    moe = rebuild_moe(description, layers, state)
    moe.views = int(params.get("views", 1))
    record = _measure(ctx, params, moe, description.get("bits_by_layer", {}), folder, seed, threads, repeats)
    record.update({key: trained[key] for key in TRAINING_RECORD if key in trained})
    return record


def _measure(
    ctx: TrialContext,
    params: dict,
    moe: MixtureOfExperts,
    bits_by_layer: dict[str, int],
    folder: Path,
    seed: int,
    threads: int,
    repeats: int,
) -> dict:
    """Save ``moe`` to ``folder`` (checkpoint + ONNX bundle) and measure what the trial reports."""
    data = ctx.data
    hybrid = hybrid_config(params, ctx.cfg.model.channel_multiple)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    torch_val = evaluate(moe, data.val)
    if not math.isfinite(torch_val):
        raise CompressionError("validation accuracy is not finite")
    description = moe_description(
        ctx.cfg.model.arch, ctx.cfg.model.width, data.channels, data.num_classes, moe, hybrid.moe.gate_size
    )
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(moe, folder / "model", {**description, "bits_by_layer": bits_by_layer})
    int8 = hybrid.quantize.bits < 32
    calibration = data.train.subset(min(1.0, 512 / max(1, len(data.train))), seed=seed).images
    manifest = deploy_moe(
        moe,
        folder / "bundle",
        calibration,
        int8=int8,
        extra_manifest={
            "dataset": data.name,
            "class_names": data.class_names,
            "mean": data.mean,
            "std": data.std,
            "params": {key: value for key, value in params.items()},
        },
    )
    bundle = load_bundle(folder / "bundle", threads=threads)
    seconds["deploy"] = time.perf_counter() - started

    started = time.perf_counter()
    val_images = data.val.images.numpy()
    logits = np.concatenate(
        [bundle(val_images[index : index + 256]) for index in range(0, len(val_images), 256)]
    )
    deployed_val = float((logits.argmax(axis=1) == data.val.labels.numpy()).mean())
    agree = agreement(moe, bundle, data.val.images[:512])
    timing = measure_moe_latency(bundle, val_images[:1], threads=threads, batch=1, repeats=repeats, warmup=5)
    macs = count_macs(moe, data.val.images)  # routed: gate + the experts each val image (and view) used
    size = packed_size_bytes(moe, lambda name: bits_by_layer.get(name, 32), skip=moe.idle_parts)
    seconds["measure"] = time.perf_counter() - started
    table = routing_table(moe, data.val, data.num_classes)
    return {
        "val_accuracy": deployed_val,
        "val_accuracy_torch": torch_val,
        "mmacs": macs / 1e6,
        "latency_ms": timing["latency"]["median_ms"],
        "latency": timing["latency"],
        "routing_share": timing["routing_share"],
        "size_kb": size / 1024,
        "params": count_params(moe),
        "bits": hybrid.quantize.bits,
        "precision": manifest.get("precision"),
        "top1_agreement_with_torch": agree["top1_agreement"],
        "routing_per_class": table.tolist(),
        "seconds": seconds,
        "effective_top_k": hybrid.moe.top_k,
    }


REJECTED = "rejected before training"  # the reason prefix of a configuration that breaks a budget


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose configuration was already evaluated: its result was reused (``duplicate_of``)."""
    return "duplicate_of" in trial.user_attrs


def _config_key(params: dict, ignore: tuple[str, ...] = ()) -> tuple:
    """What determines a trial's model (``top_k`` only through its effective, clipped value). A single
    expert runs without a gate, so what only a gate uses (``GATE_ONLY``) changes nothing."""
    ignored = {"top_k", *ignore}
    if int(params.get("num_experts", 1)) == 1:
        ignored |= set(GATE_ONLY)
    return tuple(sorted((key, value) for key, value in params.items() if key not in ignored))


def model_key(params: dict) -> tuple:
    """What determines the trained model of a configuration: two configurations with one key differ in
    inference only (``INFERENCE_ONLY``, e.g. test-time views), so one training serves both."""
    return _config_key(params, INFERENCE_ONLY)


def _earliest(
    trial: optuna.Trial, key: tuple, ignore: tuple[str, ...] = ()
) -> optuna.trial.FrozenTrial | None:
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        config = other.user_attrs.get("config")
        if config and not is_repeat(other) and _config_key(config, ignore) == key:
            return other
    return None


def _same_config(trial: optuna.Trial, params: dict) -> optuna.trial.FrozenTrial | None:
    """The earliest completed trial (not itself a copy) with exactly this configuration, if any."""
    return _earliest(trial, _config_key(params))


def _same_model(trial: optuna.Trial, params: dict) -> optuna.trial.FrozenTrial | None:
    """The earliest completed trial that trained this configuration's model (it may differ in test-time
    views only, which change inference, not training), if any."""
    return _earliest(trial, model_key(params), INFERENCE_ONLY)


class Objective:
    """The callable handed to ``study.optimize``."""

    def __init__(self, ctx: TrialContext, target_trials: int | None = None) -> None:
        self.ctx = ctx
        self.target_trials = target_trials

    def _surplus(self, trial: optuna.Trial) -> bool:
        """True when trials numbered before this one already fill the target (parallel workers raced).

        Repeats of evaluated configurations (``duplicate_of``) do not count toward the target."""
        if self.target_trials is None:
            return False
        ahead = [
            t
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            if t.number < trial.number and not is_repeat(t)
        ]
        return len(ahead) >= self.target_trials

    def __call__(self, trial: optuna.Trial) -> tuple[float, float, float]:
        cfg = self.ctx.cfg
        if self._surplus(trial):
            trial.set_user_attr("fail_reason", "not needed: the target number of trials is already reached")
            raise optuna.TrialPruned("surplus trial")
        params = suggest(trial, cfg.space)
        trial.set_user_attr("config", params)
        original = _same_config(trial, params)
        if original is not None:
            # Samplers revisit points of a discrete space; same configuration, budget and seed give the
            # same model, so the result is reused instead of spending minutes training it again.
            log.info(
                "trial %d: same configuration as trial %d; its result is reused",
                trial.number,
                original.number,
            )
            for key, value in original.user_attrs.items():
                if key not in ("config", "reference"):
                    trial.set_user_attr(key, value)
            trial.set_user_attr("duplicate_of", original.number)
            self._set_constraints(trial, original.user_attrs)
            return tuple(original.values)
        started = time.perf_counter()
        try:
            self._check_budget(trial, params)
            folder = self.ctx.study_folder / "trials" / f"trial_{trial.number}"
            settings = {
                "seed": cfg.seed,
                "threads": cfg.measure.latency_threads,
                "repeats": cfg.measure.latency_repeats,
            }
            trained = _same_model(trial, params)
            source = (
                None
                if trained is None
                else self.ctx.study_folder / "trials" / f"trial_{trained.number}" / "model"
            )
            if source is not None and source.with_suffix(".json").exists():
                log.info(
                    "trial %d: trial %d's model with %s test-time view(s)",
                    trial.number,
                    trained.number,
                    params.get("views", 1),
                )
                record = evaluate_views(self.ctx, params, trained.user_attrs, source, folder, **settings)
                record["model_of"] = trained.number
            else:
                record = evaluate_config(self.ctx, params, cfg.trial, folder, **settings)
        except optuna.TrialPruned:
            raise
        except (CompressionError, RuntimeError, ValueError) as error:
            reason = f"{type(error).__name__}: {error}"
            trial.set_user_attr("fail_reason", reason[:2000])
            log.warning("trial %d failed: %s", trial.number, reason)
            raise CompressionError(reason) from error
        record["seconds"]["total"] = time.perf_counter() - started
        for key, value in record.items():
            trial.set_user_attr(key, value)
        self._set_constraints(trial, record)
        if "model_of" not in record and not trial.user_attrs.get("reference"):
            self._enqueue_other_views(trial, params)
        return record["val_accuracy"], record["mmacs"], record["latency_ms"]

    def _enqueue_other_views(self, trial: optuna.Trial, params: dict) -> None:
        """Queue this trained model with every other ``space.views`` value as the next trials: each is a
        re-measurement (seconds, no training), so every trained model is seen with and without views."""
        for views in self.ctx.cfg.space.views:
            if views != params.get("views", 1):
                trial.study.enqueue_trial(
                    {**trial.params, "views": views},
                    user_attrs={"views_of": trial.number},
                    skip_if_exists=True,
                )

    def _check_budget(self, trial: optuna.Trial, params: dict) -> None:
        limits = self.ctx.cfg.constraints
        if limits.max_mmacs is None and limits.max_size_kb is None:
            return
        cost = estimate_cost(self.ctx, params)
        for key, limit in (("mmacs", limits.max_mmacs), ("size_kb", limits.max_size_kb)):
            if limit is not None and cost[key] > limit:
                reason = f"{REJECTED}: {key} {cost[key]:.3f} > constraints.max_{key} {limit}"
                trial.set_user_attr("fail_reason", reason)
                raise optuna.TrialPruned(reason)

    def _set_constraints(self, trial: optuna.Trial, record: dict) -> None:
        limits = self.ctx.cfg.constraints
        if limits.max_latency_ms is not None:
            trial.set_constraint("latency_ms", record["latency_ms"] - limits.max_latency_ms)
        if limits.max_size_kb is not None:
            trial.set_constraint("size_kb", record["size_kb"] - limits.max_size_kb)
        if limits.min_accuracy is not None:
            trial.set_constraint("val_accuracy", limits.min_accuracy - record["val_accuracy"])
        if limits.max_mmacs is not None:
            trial.set_constraint("mmacs", record["mmacs"] - limits.max_mmacs)
