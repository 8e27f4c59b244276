"""The hybrid compression pipeline of one configuration, end to end (torch only, no Optuna):

    teacher --remove residual blocks (depth)--> shallower --NNI prune + ModelSpeedup--> pruned --KD fine-tune--> expert
            --copy K times + gate (or split: shared trunk + K expert tails)--> MoE --gate warm start, joint KD training (sparse top-k)
              (or, moe.expert_training group, each expert on its class group's images alone)-->
            --NNI QAT of experts (bits) and gate (8 bit), baked--> compressed MoE

``expert_init`` says where the K experts come from:

- ``copies``: one teacher is pruned and fine-tuned once; the experts start as K copies of it and
  differ only by what the MoE stage teaches each of them.
- ``teachers``: expert i is pruned from teacher ``i mod N`` of the N teachers (``baseline.teachers``)
  and fine-tuned on its own, so experts start as different networks (different weights, different
  pruned channels) and their errors overlap less: what a top-2 combination needs to beat one expert.
  It costs one fine-tune per distinct teacher used.

Depth reduction (:mod:`pipelines.compress.depth`) runs before channel pruning, on a copy of each teacher,
and the fine-tune that follows pruning recovers what both removed.

Quantization comes last (after the MoE is assembled and trained) so that the weights that are deployed
are exactly the quantized ones: any training after QAT would move them off the grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from pipelines.compress.depth import DepthConfig, remove_blocks
from pipelines.compress.prune import PruneConfig, PruneResult, check_exclude, prune
from pipelines.compress.quantize import QuantizeConfig, quantize
from pipelines.data import Dataset
from pipelines.errors import ConfigError, unknown_name
from pipelines.group_training import train_on_groups
from pipelines.measure import count_params
from pipelines.moe import MixtureOfExperts, MoEConfig, build_moe, warm_start_gate
from pipelines.train import TrainConfig, evaluate, train

__all__ = [
    "EXPERT_INITS",
    "DEFAULT_EXPERT_INIT",
    "HybridConfig",
    "StageBudget",
    "HybridResult",
    "compress_hybrid",
    "compress_expert",
]

EXPERT_INITS = ("copies", "teachers")
DEFAULT_EXPERT_INIT = "copies"  # what a configuration without expert_init gets


@dataclass(frozen=True)
class HybridConfig:
    prune: PruneConfig
    quantize: QuantizeConfig
    moe: MoEConfig
    expert_init: str = DEFAULT_EXPERT_INIT  # copies | teachers (EXPERT_INITS)
    depth: DepthConfig = field(default_factory=DepthConfig)  # residual blocks removed before pruning

    @property
    def compresses_experts(self) -> bool:
        """Whether an expert differs from its teacher before the MoE stage (pruned or made shallower)."""
        return self.prune.sparsity > 0 or self.depth.active

    def __post_init__(self) -> None:
        if self.expert_init not in EXPERT_INITS:
            raise unknown_name("expert_init", self.expert_init, EXPERT_INITS)
        if self.moe.layout == "shared" and self.expert_init != "copies":
            raise ConfigError(
                f"expert_init: {self.expert_init!r} prunes each expert from a different teacher, but moe.layout "
                "'shared' splits one pruned network into trunk and experts. Use expert_init: copies."
            )


@dataclass(frozen=True)
class StageBudget:
    """Epochs per stage (fractions allowed) and the shared training settings."""

    finetune_epochs: float = 2.0
    gate_epochs: float = 1.0
    moe_epochs: float = 2.0
    qat_epochs: float = 0.5
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.02, kd_alpha=0.7))

    def __post_init__(self) -> None:
        for name in ("finetune_epochs", "gate_epochs", "moe_epochs", "qat_epochs"):
            value = getattr(self, name)
            if not 0 <= value <= 1000:
                raise ConfigError(f"budget.{name}: {value} is out of range; use a value in [0, 1000].")
        if self.qat_epochs <= 0:
            raise ConfigError(
                f"budget.qat_epochs: {self.qat_epochs} must be > 0 (QAT needs steps to learn scales)."
            )


@dataclass
class HybridResult:
    moe: MixtureOfExperts
    expert_params: int
    params_before: int
    achieved_sparsity: float
    bits_by_layer: dict[str, int]
    seconds: dict[str, float]
    class_assignment: list[int]
    stage_accuracy: dict[str, float] = field(default_factory=dict)


def compress_hybrid(
    teacher: nn.Module,
    data: Dataset,
    cfg: HybridConfig,
    budget: StageBudget,
    seed: int = 0,
    sources: list[nn.Module] | None = None,
    on_stage: Callable[[str, float, float], None] | None = None,
) -> HybridResult:
    """Run every stage on ``teacher`` (left untouched) and return the compressed MoE with a record.

    ``sources``: the teachers that ``expert_init: teachers`` prunes the experts from (``teacher`` first);
    unused with ``copies``. ``on_stage(stage, seconds, val_accuracy)`` is called as each stage finishes
    (prune, finetune, moe, quantize).
    """
    report = on_stage or (lambda stage, seconds, accuracy: None)
    seconds: dict[str, float] = {}
    stage_accuracy: dict[str, float] = {}  # validation accuracy after each stage: where accuracy is lost
    example = data.val.images[:2]
    torch.manual_seed(seed)
    origins = _expert_origins(teacher, cfg, sources)
    for origin in origins:
        origin.eval()

    base = budget.train.replace(seed=seed)
    # Nothing was removed at sparsity 0 and no depth reduction: the expert is the teacher itself and needs
    # no recovery.
    unpruned = not cfg.compresses_experts
    experts, pruned_accuracy, finetuned_accuracy = [], [], []
    seconds["prune"] = 0.0
    for index, origin in enumerate(origins):
        pruned = compress_expert(origin, cfg, data.train.images, example)
        if index == 0:
            pruned_first = pruned
        seconds["prune"] += pruned.seconds
        expert = pruned.model
        pruned_accuracy.append(evaluate(expert, data.val))
        if budget.finetune_epochs > 0 and not unpruned:
            started = time.perf_counter()
            # each origin its own data order (seed + index); the first keeps the study's seed
            train(expert, data.train, base.replace(epochs=budget.finetune_epochs, seed=seed + index), origin)
            seconds["finetune"] = seconds.get("finetune", 0.0) + time.perf_counter() - started
        finetuned_accuracy.append(evaluate(expert, data.val))
        experts.append(expert)
    # means over the origins (one value with copies)
    stage_accuracy["pruned"] = sum(pruned_accuracy) / len(origins)
    stage_accuracy["finetuned"] = sum(finetuned_accuracy) / len(origins)
    report("prune", seconds["prune"], stage_accuracy["pruned"])
    if "finetune" in seconds:
        report("finetune", seconds["finetune"], stage_accuracy["finetuned"])

    started = time.perf_counter()
    moe = build_moe(experts, data.channels, cfg.moe, seed=seed)
    assignment = warm_start_gate(
        moe,
        data.train.subset(base.subset, seed=seed),
        data.num_classes,
        epochs=max(budget.gate_epochs, 0.05),
        seed=seed,
        teacher=teacher,
        augment=base.augment,
    )
    # One unpruned expert behind a gate that can only pick it is the teacher: training would only
    # distil the teacher into itself.
    if budget.moe_epochs > 0 and not (unpruned and cfg.moe.num_experts == 1):
        if cfg.moe.expert_training == "group":
            train_on_groups(moe, data.train, base.replace(epochs=budget.moe_epochs), teacher)
        else:
            train(moe, data.train, base.replace(epochs=budget.moe_epochs), teacher)
    seconds["moe"] = time.perf_counter() - started
    stage_accuracy["moe"] = evaluate(moe, data.val)
    report("moe", seconds["moe"], stage_accuracy["moe"])

    quantized = quantize(
        moe,
        cfg.quantize,
        data.train,
        base.replace(epochs=budget.qat_epochs, lr=base.lr * 0.25, schedule="cosine"),
        teacher,
        example,
        skip_layers=moe.idle_parts,  # a gate that never runs gets no scale from QAT
    )
    seconds["quantize"] = quantized.seconds
    moe.eval()
    stage_accuracy["quantized"] = evaluate(moe, data.val)
    report("quantize", seconds["quantize"], stage_accuracy["quantized"])
    return HybridResult(
        moe=moe,
        expert_params=pruned_first.params_after,
        params_before=pruned_first.params_before,  # the teacher's: depth and pruning together
        achieved_sparsity=pruned_first.achieved_sparsity,
        bits_by_layer=quantized.bits_by_layer,
        seconds=seconds,
        class_assignment=assignment,
        stage_accuracy=stage_accuracy,
    )


def compress_expert(
    origin: nn.Module, cfg: HybridConfig, train_images: torch.Tensor, example: torch.Tensor
) -> PruneResult:
    """One expert before training: ``origin`` (left untouched) without ``cfg.depth``'s residual blocks (ranked on
    a fixed sample of ``train_images``, unlabelled) and then channel-pruned with ``cfg.prune``. Its
    ``seconds`` cover both steps. ``search.evaluation.estimate_cost`` counts the same model."""
    if not cfg.depth.active:
        return prune(origin, cfg.prune, example)
    check_exclude(origin, cfg.prune.exclude)  # a typo fails even where its block is removed
    reduced = remove_blocks(origin, cfg.depth, train_images, example[:1])
    kept = {name for name, _ in reduced.model.named_modules()}
    # names under a removed block have nothing left to protect
    exclude = tuple(name for name in cfg.prune.exclude if name in kept)
    pruned = prune(reduced.model, replace(cfg.prune, exclude=exclude), example)
    pruned.seconds += reduced.seconds
    pruned.params_before = count_params(origin)
    return pruned


def _expert_origins(
    teacher: nn.Module, cfg: HybridConfig, sources: list[nn.Module] | None
) -> list[nn.Module]:
    """The teachers the experts are pruned from: ``[teacher]`` for copies; for ``teachers``, one per
    expert up to the number of teachers (expert i of the MoE is a copy of origin ``i mod len``)."""
    if cfg.expert_init == "copies":
        return [teacher]
    sources = list(sources or [teacher])
    if len(sources) < 2:
        raise ConfigError(
            f"expert_init: 'teachers' prunes each expert from a different teacher, but there is "
            f"{len(sources)} teacher. Set baseline.teachers to 2 or more, or use expert_init: copies."
        )
    return sources[: cfg.moe.num_experts]
