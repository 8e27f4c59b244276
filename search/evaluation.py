"""The torch side of a trial, without Optuna: train a configuration's model, measure a trained model.

Training (:func:`train_model`) compresses the teacher with the configuration; measuring (:func:`measure`)
saves a trained model with the trial's inference settings (test-time views), deploys it as ONNX, runs it on
the study's engine and records accuracy, MACs, size and latency (against the teacher: :mod:`search.latency`)
of what is deployed. The two are separate because one
trained model is measured under several inference settings (:mod:`search.model_cache`).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from torch import nn

from pipelines.compress.depth import DepthConfig
from pipelines.compress.prune import PruneConfig
from pipelines.compress.quantize import QuantizeConfig
from pipelines.data import Dataset
from pipelines.deploy.bundle import agreement, deploy_moe
from pipelines.deploy.latency_model import predict_deployed
from pipelines.deploy.latency_table import default_table_path, load_table
from pipelines.deploy.routing_cost import routing_share
from pipelines.deploy.runtime import load_bundle, load_single_file, measure_moe_latency
from pipelines.errors import CompressionError, ConfigError
from pipelines.hybrid import DEFAULT_EXPERT_INIT, HybridConfig, compress_expert, compress_hybrid
from pipelines.measure import count_macs, count_params, packed_size_bytes
from pipelines.moe import (
    DEFAULT_EXPERT_TRAINING,
    DEFAULT_LAYOUT,
    DEFAULT_ROUTING,
    Gate,
    MoEConfig,
    TrunkGate,
    moe_description,
    routing_table,
)
from pipelines.serialize import save_checkpoint
from pipelines.train import evaluate
from search.config import Budget, ModelSettings, SearchConfig, setup_fingerprint
from search.latency import (
    LatencyReference,
    read_block_time,
    reference_bundle,
    time_against_teacher,
    time_at_batch,
)
from search.model_cache import TrainedModel
from search.record import PER_EXPERT_FILES, SINGLE_FILE, Measurement, Training, TrialRecord
from search.targets import compute_targets, distillation_targets

__all__ = [
    "TrialContext",
    "hybrid_config",
    "estimate_cost",
    "train_model",
    "measure",
    "train_and_measure",
    "stage_logger",
    "log_measured",
]

log = logging.getLogger("hycomp")
# interleaved rounds of 2 calls each at measure.throughput_batch: about 0.3 s a trial for a ResNet-20 at 64
THROUGHPUT_ROUNDS = 7


@dataclass
class TrialContext:
    cfg: SearchConfig
    data: Dataset
    teacher: nn.Module  # the fp32 model that is compressed (pruned into the experts)
    study_folder: Path
    distill_from: list[nn.Module] | None = None  # every teacher of ``kd_targets: ensemble``; None: [teacher]
    # The cache keys of ``distill_from`` (search.baseline.baseline_key): with them, distillation targets are
    # kept under the results root's baselines/ and shared by every process; without, computed here only.
    teacher_keys: tuple[str, ...] = ()
    # The study's engine and teacher latency (search.latency.study_reference): trials are timed interleaved
    # with the teacher's bundle and scored by the ratio. None: timed alone on ONNX Runtime (no study).
    latency: LatencyReference | None = None
    _ensembles: dict[str, Dataset] = field(default_factory=dict, repr=False)
    _teacher_mmacs: float | None = field(default=None, repr=False)

    def block_time(self) -> dict[str, float]:
        """Each removable block's share of the teacher's deployed latency, measured once for the study
        (:func:`search.latency.study_block_time`) and kept in its folder."""
        return read_block_time(self.study_folder)

    @property
    def teacher_mmacs(self) -> float:
        """The teacher's MMACs per image, the denominator of a trial's MACs ratio."""
        if self._teacher_mmacs is None:
            self._teacher_mmacs = count_macs(self.teacher, self.data.val.images[:8]) / 1e6
        return self._teacher_mmacs

    def setup(self) -> str:
        """What shapes a trained model besides its configuration, budget and seed
        (:func:`search.config.setup_fingerprint` on this context's data)."""
        return setup_fingerprint(self.cfg, self.data.fingerprint)

    def training_data(self, budget: Budget) -> Dataset:
        """The dataset a budget trains on. With ``kd_targets: ensemble`` its train split carries the
        teachers' logits averaged over the symmetries of ``budget.augment`` and over the teachers
        (:mod:`search.targets`: computed once per teachers, augment and data and kept on disk when the
        context has ``teacher_keys``), which the students distil from instead of running a teacher at
        each step."""
        if budget.kd_targets == "online":
            return self.data
        if budget.augment not in self._ensembles:
            teachers = self.distill_from or [self.teacher]
            if self.teacher_keys:
                logits = distillation_targets(
                    teachers, self.teacher_keys, self.data, budget.augment, self.study_folder.parent
                )
            else:
                logits = compute_targets(teachers, self.data.train, budget.augment)
            self._ensembles[budget.augment] = replace(
                self.data, train=self.data.train.with_teacher_logits(logits)
            )
        return self._ensembles[budget.augment]


def hybrid_config(
    params: dict, model: ModelSettings, block_time: Callable[[], dict[str, float]] | None = None
) -> HybridConfig:
    """The pipelines' configuration of a trial's parameters; a parameter the space does not search (a
    one-choice ``routing``, ``expert_init``, ``views``, ``expert_training`` or ``block_ranking``, or no
    ``blocks_removed``) takes the pipelines' default. ``block_time`` gives the blocks' latency shares that a
    ``block_ranking: latency`` trial ranks by (:attr:`TrialContext.block_time`)."""
    ranking = params.get("block_ranking", DepthConfig.ranking)
    shares = block_time() if ranking == "latency" and block_time is not None else {}
    return HybridConfig(
        prune=PruneConfig(
            sparsity=float(params["sparsity"]),
            pruner=params["pruner"],
            channel_multiple=model.channel_multiple,
            exclude=model.exclude,
        ),
        quantize=QuantizeConfig(
            bits=int(params["bits"]), method=params.get("quantizer", QuantizeConfig.method)
        ),
        moe=MoEConfig(
            num_experts=int(params["num_experts"]),
            top_k=min(int(params["top_k"]), int(params["num_experts"])),
            gate_size=int(params["gate_size"]),
            routing=params.get("routing", DEFAULT_ROUTING),
            views=int(params.get("views", MoEConfig.views)),
            layout=params.get("layout", DEFAULT_LAYOUT),
            split_at=int(params.get("split_at", MoEConfig.split_at)),
            expert_training=params.get("expert_training", DEFAULT_EXPERT_TRAINING),
        ),
        expert_init=params.get("expert_init", DEFAULT_EXPERT_INIT),
        depth=DepthConfig(
            blocks_removed=int(params.get("blocks_removed", 0)),
            ranking=ranking,
            block_time=tuple(sorted(shares.items())),
        ),
    )


def _description(ctx: TrialContext, moe, gate_size: int) -> dict:
    data = ctx.data
    return moe_description(
        ctx.cfg.model.spec, data.channels, data.num_classes, data.image_size, moe, gate_size
    )


def estimate_cost(ctx: TrialContext, params: dict) -> dict:
    """MACs and packed size of a configuration before any training (depth reduction, prune + speedup
    only: seconds)."""
    cfg = hybrid_config(params, ctx.cfg.model, ctx.block_time)
    example = ctx.data.val.images[:2]
    # the expert that training starts from: removed blocks (if any) and pruned channels really gone
    expert = compress_expert(ctx.teacher, cfg, ctx.data.train.images, example).model
    bits = cfg.quantize.bits
    if cfg.moe.layout == "shared":
        return _shared_cost(expert, cfg.moe, bits, example)
    expert_macs, gate_macs = count_macs(expert, example), 0
    size = cfg.moe.num_experts * packed_size_bytes(expert, bits)
    if cfg.moe.num_experts > 1:  # a one-expert MoE skips its gate
        gate = Gate(ctx.data.channels, cfg.moe.num_experts, cfg.moe.gate_size)
        gate_macs = count_macs(gate, example)
        size += packed_size_bytes(gate, min(bits, 8) if bits < 32 else 32)
    per_view = gate_macs + cfg.moe.top_k * expert_macs
    return {"mmacs": cfg.moe.views * per_view / 1e6, "size_kb": size / 1024}


def _shared_cost(pruned: nn.Module, moe: MoEConfig, bits: int, example) -> dict:
    """:func:`estimate_cost` of the shared layout: trunk + gate + top-k tails per view; size counts the
    trunk, the gate (8 bits at most, skipped with one expert) and every tail. The trunk's first layer and
    each tail's classifier keep 8 bits as QAT gives them; the estimate counts them at ``bits`` like the
    separate layout's does."""
    import torch

    from pipelines.stages import output_channels, split_model

    trunk, tail = split_model(pruned, moe.split_at)
    with torch.no_grad():
        features = trunk.eval()(example)
    trunk_macs, tail_macs, gate_macs = count_macs(trunk, example), count_macs(tail, features), 0
    size = packed_size_bytes(trunk, bits) + moe.num_experts * packed_size_bytes(tail, bits)
    if moe.num_experts > 1:
        gate = TrunkGate(output_channels(trunk), moe.num_experts, moe.gate_size)
        gate_macs = count_macs(gate, features)
        size += packed_size_bytes(gate, min(bits, 8) if bits < 32 else 32)
    per_view = trunk_macs + gate_macs + moe.top_k * tail_macs
    return {"mmacs": moe.views * per_view / 1e6, "size_kb": size / 1024}


def stage_logger(label: str):
    """An ``on_stage`` callback of :func:`pipelines.hybrid.compress_hybrid` that logs one line per finished
    stage, prefixed with ``label`` (``trial 7``, ``export``)."""

    def on_stage(stage: str, seconds: float, val_accuracy: float) -> None:
        log.info("%s: %s done in %.0f s (val %.4f)", label, stage, seconds, val_accuracy)

    return on_stage


def train_model(
    ctx: TrialContext,
    params: dict,
    budget: Budget,
    seed: int,
    label: str = "compress",
    on_stage: Callable[[str, float, float], None] | None = None,
) -> TrainedModel:
    """Compress the teacher with ``params`` at ``budget``: the trained model and what training reported.
    Each finished stage is logged as ``<label>: <stage> done in N s``, then passed to ``on_stage`` (which
    may raise to stop the training: :mod:`search.early_stop`)."""
    hybrid = hybrid_config(params, ctx.cfg.model, ctx.block_time)
    logged = stage_logger(label)

    def each_stage(stage: str, seconds: float, val_accuracy: float) -> None:
        logged(stage, seconds, val_accuracy)
        if on_stage is not None:
            on_stage(stage, seconds, val_accuracy)

    result = compress_hybrid(
        ctx.teacher,
        ctx.training_data(budget),
        hybrid,
        budget.stage_budget(seed),
        seed=seed,
        sources=ctx.distill_from,
        on_stage=each_stage,
    )
    description = _description(ctx, result.moe, hybrid.moe.gate_size)
    return TrainedModel(
        moe=result.moe,
        description={**description, "bits_by_layer": result.bits_by_layer},
        training=Training(
            expert_params=result.expert_params,
            achieved_sparsity=result.achieved_sparsity,
            class_assignment=result.class_assignment,
            stage_val_accuracy=result.stage_accuracy,
        ),
        seconds=dict(result.seconds),
    )


def measure(
    ctx: TrialContext,
    params: dict,
    model: TrainedModel,
    folder: Path,
    seed: int | None = None,
    threads: int | None = None,
    repeats: int | None = None,
) -> tuple[Measurement, dict[str, float]]:
    """Save ``model`` with the inference settings of ``params`` (test-time views) to ``folder`` (checkpoint +
    ONNX bundle) and measure the deployed engine. Returns the measurement and its seconds per step.
    ``seed``, ``threads`` and ``repeats`` default to the study's (``seed``, ``measure:``)."""
    cfg = ctx.cfg
    seed = cfg.seed if seed is None else seed
    threads = cfg.measure.latency_threads if threads is None else threads
    repeats = cfg.measure.latency_repeats if repeats is None else repeats
    data = ctx.data
    hybrid = hybrid_config(params, ctx.cfg.model, ctx.block_time)
    moe = model.moe
    moe.views = hybrid.moe.views
    bits_by_layer = model.description.get("bits_by_layer", {})
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    torch_val = evaluate(moe, data.val)
    if not math.isfinite(torch_val):
        raise CompressionError("validation accuracy is not finite")
    description = _description(ctx, moe, hybrid.moe.gate_size)
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
            "params": dict(params),
        },
    )
    reference = ctx.latency
    engine = reference.engine if reference is not None else "onnxruntime"
    bundle = load_bundle(folder / "bundle", threads=threads, engine=engine)
    # A multi-expert model deploys as its one file (model.onnx, routing in the graph): that file is timed,
    # and its gate + routing share measured; a single net's bundle is one network call either way.
    multi = manifest.num_experts > 1
    seconds["deploy"] = time.perf_counter() - started

    started = time.perf_counter()
    val_images = data.val.images.numpy()
    logits = np.concatenate(
        [bundle(val_images[index : index + 256]) for index in range(0, len(val_images), 256)]
    )
    deployed_val = float((logits.argmax(axis=1) == data.val.labels.numpy()).mean())
    agree = agreement(moe, bundle, data.val.images[:512])
    if cfg.measure.latency == "predicted":
        timing = predicted_timing(ctx, folder / "bundle", threads, val_images[:1])
    else:
        timed = load_single_file(folder / "bundle", threads=threads, engine=engine) if multi else bundle
        timing = _time(ctx, timed, val_images, threads, repeats)
        if multi:
            # 150 calls of each file in 15 rounds (its default): steadier under load than the latency's
            # repeats, for a fraction of a second (results/benchmarks/routing_share_load_*.md)
            timing["routing_share"] = routing_share(
                folder / "bundle", val_images[:1], engine=engine, threads=threads
            )
    macs = count_macs(moe, data.val.images)  # routed: gate + the experts each val image (and view) used
    macs_ratio = macs / 1e6 / ctx.teacher_mmacs
    size = packed_size_bytes(moe, lambda name: bits_by_layer.get(name, 32), skip=moe.idle_parts)
    seconds["measure"] = time.perf_counter() - started
    table = routing_table(moe, data.val, data.num_classes)
    measurement = Measurement(
        val_accuracy=deployed_val,
        val_accuracy_torch=torch_val,
        mmacs=macs / 1e6,
        latency_ms=timing["latency_ms"],
        latency=timing["latency"],
        routing_share=timing["routing_share"],
        routing_share_of=SINGLE_FILE if multi else PER_EXPERT_FILES,
        size_kb=size / 1024,
        params=count_params(moe),
        bits=hybrid.quantize.bits,
        precision=manifest.precision,
        top1_agreement_with_torch=agree["top1_agreement"],
        routing_per_class=table.tolist(),
        effective_top_k=hybrid.moe.top_k,
        engine=engine,
        latency_ratio=timing["latency_ratio"],
        latency_ratio_min=timing["latency_ratio_min"],
        teacher_latency=timing["teacher_latency"],
        macs_ratio=macs_ratio,
        batch_latency_ratio=timing.get("batch_latency_ratio"),
        batch_latency=timing.get("batch_latency"),
        teacher_batch_latency=timing.get("teacher_batch_latency"),
    )
    return measurement, seconds


def predicted_timing(ctx: TrialContext, bundle: Path, threads: int, image: np.ndarray | None = None) -> dict:
    """``measure_moe_latency``'s answer from the latency table instead of a timing (``measure.latency:
    predicted``): the study's ``measure.profile`` or this machine's table under the results root, routed as
    ``image`` routes (the image a measured timing would use)."""
    settings = ctx.cfg.measure
    root = ctx.study_folder.parent
    engine = ctx.latency.engine if ctx.latency is not None else "onnxruntime"  # the study's engine
    path = Path(settings.profile) if settings.profile else default_table_path(root, engine, threads)
    table = load_table(path, engine, threads, any_cpu=settings.profile_any_cpu)
    milliseconds = predict_deployed(bundle, table, image=image)
    latency = {"median_ms": milliseconds, "source": "predicted", "table": str(path), "cpu": table.cpu}
    return {
        "latency": latency,
        "routing_share": None,
        "latency_ms": milliseconds,
        "latency_ratio": None,
        "latency_ratio_min": None,
        "teacher_latency": None,
    }


def _time(ctx: TrialContext, bundle, images: np.ndarray, threads: int, repeats: int) -> dict:
    """The batch-1 latency of a deployed ``bundle`` on ``images[:1]``: with the study's reference, interleaved
    with the teacher's bundle on its engine (``latency_ms`` = ratio x the teacher's quiet median), and so at
    ``measure.throughput_batch`` too (:func:`_time_batch`); without, alone."""
    image = images[:1]
    reference = ctx.latency
    if reference is None:
        timing = measure_moe_latency(bundle, image, threads=threads, batch=1, repeats=repeats, warmup=5)
        return {
            **timing,
            "latency_ms": timing["latency"]["median_ms"],
            "latency_ratio": None,
            "latency_ratio_min": None,
            "teacher_latency": None,
        }
    if threads != reference.threads:
        raise ConfigError(
            f"threads: {threads}, but the study's teacher latency was timed with {reference.threads} thread(s); "
            "its ratio would compare unlike runs. Measure with the study's measure.latency_threads."
        )
    teacher = load_bundle(reference_bundle(ctx.study_folder), threads=threads, engine=reference.engine)
    settings = ctx.cfg.measure
    rounds = min(settings.rounds, repeats)
    stats, share = time_against_teacher(
        bundle, teacher, image, reference, rounds=rounds, calls_per_round=math.ceil(repeats / rounds)
    )
    return {
        "latency": stats.candidate.as_dict(),
        "routing_share": share,
        "latency_ms": stats.ratio * reference.teacher_median_ms,
        "latency_ratio": stats.ratio,
        "latency_ratio_min": stats.ratio_min,
        "teacher_latency": stats.reference.as_dict(),
        **_time_batch(ctx, bundle, teacher, images),
    }


def _time_batch(ctx: TrialContext, bundle, teacher, images: np.ndarray) -> dict:
    """``bundle`` timed against ``teacher`` at ``measure.throughput_batch``; empty without one."""
    batch = ctx.cfg.measure.throughput_batch
    if batch is None:
        return {}
    stats = time_at_batch(bundle, teacher, images, ctx.latency, batch, rounds=THROUGHPUT_ROUNDS)
    return {
        "batch_latency_ratio": stats.ratio,
        "batch_latency": stats.candidate.as_dict(),
        "teacher_batch_latency": stats.reference.as_dict(),
    }


def log_measured(label: str, seconds: dict[str, float]) -> None:
    """One line for the deployment and measurement of :func:`measure`."""
    log.info(
        "%s: deploy done in %.0f s, measure done in %.0f s", label, seconds["deploy"], seconds["measure"]
    )


def train_and_measure(
    ctx: TrialContext,
    params: dict,
    budget: Budget,
    folder: Path,
    seed: int,
    threads: int,
    repeats: int,
    label: str = "compress",
) -> TrialRecord:
    """Train ``params`` at ``budget`` (no cache) and measure it into ``folder``: the record of that run.
    Each finished stage, deployment and measurement included, is logged with ``label``."""
    started = time.perf_counter()
    model = train_model(ctx, params, budget, seed, label)
    measurement, seconds = measure(ctx, params, model, folder, seed, threads, repeats)
    log_measured(label, seconds)
    return TrialRecord(
        config=dict(params),
        trained=True,
        training=model.training,
        measurement=measurement,
        seconds={**model.seconds, **seconds, "total": time.perf_counter() - started},
    )
