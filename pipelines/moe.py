"""Mixture of Experts over compressed models: a small conv gate routes each input to its top-k experts.

Training dispatches sparsely: each sample runs only through its chosen experts, so a step costs about
one expert + gate, not K. Two routing modes (``MoEConfig.routing``):

- ``class-groups`` (default): classes are split into K groups of about equal training mass, putting
  classes the teacher confuses into the SAME group (so the gate separates easy groups and an expert
  resolves the fine distinctions). The gate is trained with cross-entropy to predict the group; the
  experts learn from the samples the gate actually sends them. Balanced by construction, and each
  expert's specialty is readable in the routing table; unlike learned routing it cannot collapse onto
  one expert.
- ``learned``: the gate learns from the task loss (top-1 combine weight ``p / p.detach()``: value 1,
  gradient 1/p) plus a Switch-style load-balancing term.

Experts start as copies of one compressed model, or as different compressed models (one per teacher:
``pipelines.hybrid``, ``expert_init``); the gate is warm-started on the class groups.

Layouts (``MoEConfig.layout``): ``separate`` (default) gives every expert a whole compressed network and
the gate its own small conv net on the image; ``shared`` (:class:`SharedTrunkMoE`) runs the first stages
of the compressed network once per input (the trunk), the gate reads the trunk's feature map
(:class:`TrunkGate`), and each expert is a copy of the later stages from ``split_at`` on.

Expert training (``MoEConfig.expert_training``): ``joint`` (default) trains gate and experts together on
what the gate routes; ``group`` trains each expert alone on its class group's images (hard routing by label;
the gate keeps its warm start and the shared trunk stays frozen: :mod:`pipelines.group_training`).

Test-time views (``MoEConfig.views``): in eval mode the MoE averages its logits over the first ``views``
symmetries of :mod:`pipelines.symmetry` (identity, horizontal flip, vertical flip, both, then
their transposes), each routed on its own. It costs ``views`` times the MACs and latency of one pass and
is counted so (``count_macs`` runs the eval forward); training is unchanged (one view per sample).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipelines import stages, symmetry
from pipelines.data import Split
from pipelines.errors import ConfigError, unknown_name
from pipelines.models import ModelSpec

__all__ = [
    "MoEConfig",
    "Gate",
    "TrunkGate",
    "MixtureOfExperts",
    "SharedTrunkMoE",
    "LAYOUTS",
    "DEFAULT_LAYOUT",
    "EXPERT_TRAININGS",
    "DEFAULT_EXPERT_TRAINING",
    "build_moe",
    "class_groups",
    "warm_start_gate",
    "teacher_similarity",
    "ROUTINGS",
    "DEFAULT_ROUTING",
    "routing_table",
]

ROUTINGS = ("class-groups", "learned")
DEFAULT_ROUTING = "class-groups"  # one default for MoEConfig, MixtureOfExperts and old checkpoints
LAYOUTS = ("separate", "shared")
DEFAULT_LAYOUT = "separate"  # what a configuration or checkpoint without a layout gets
# joint: the MoE trains end to end on what the gate routes | group: each expert alone on its class group's
# images (pipelines.group_training)
EXPERT_TRAININGS = ("joint", "group")
DEFAULT_EXPERT_TRAINING = "joint"  # what a configuration without expert_training gets


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 2
    top_k: int = 1
    gate_size: int = 8  # channels of the gate's first conv (second conv has twice as many)
    balance_weight: float = 0.01  # learned routing: weight of the load-balancing term
    routing: str = DEFAULT_ROUTING
    gate_loss_weight: float = 1.0  # class-groups routing: weight of the gate's cross-entropy
    views: int = 1  # test-time symmetry views averaged in eval mode (pipelines.symmetry.VIEWS); each costs one more pass
    layout: str = (
        DEFAULT_LAYOUT  # separate | shared (LAYOUTS): whole-network experts, or one trunk + expert tails
    )
    split_at: int = 1  # shared layout: the first stage the experts own (1..stages-1; checked on the model)
    expert_training: str = DEFAULT_EXPERT_TRAINING  # joint | group (EXPERT_TRAININGS); training only

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts <= 16:
            raise ConfigError(f"moe.num_experts: {self.num_experts} is out of range; use 1..16.")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"moe.top_k: {self.top_k} must be between 1 and num_experts ({self.num_experts}); lower top_k "
                "or raise num_experts."
            )
        if not 1 <= self.gate_size <= 256:
            raise ConfigError(f"moe.gate_size: {self.gate_size} is out of range; use 1..256 channels.")
        if self.balance_weight < 0:
            raise ConfigError(f"moe.balance_weight: {self.balance_weight} must be >= 0.")
        if self.routing not in ROUTINGS:
            raise ConfigError(
                f"moe.routing: unknown value {self.routing!r}. Valid values: {', '.join(ROUTINGS)}."
            )
        symmetry.check_views(self.views, "moe.views")
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"moe.layout: unknown value {self.layout!r}. Valid values: {', '.join(LAYOUTS)}."
            )
        if isinstance(self.split_at, bool) or not isinstance(self.split_at, int) or self.split_at < 1:
            raise ConfigError(
                f"moe.split_at: {self.split_at!r} must be an integer >= 1 (the first stage the experts own)."
            )
        if self.expert_training not in EXPERT_TRAININGS:
            raise unknown_name("moe.expert_training", self.expert_training, EXPERT_TRAININGS)


class Gate(nn.Module):
    """Two strided 3x3 convs + global pooling + linear: a few hundred thousand MACs at 28x28."""

    def __init__(self, in_channels: int, num_experts: int, size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, size, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(size)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(size, 2 * size, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * size)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * size, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class TrunkGate(nn.Module):
    """The shared layout's gate on the trunk's feature map: 1x1 conv to ``size`` channels + pooling + linear."""

    def __init__(self, in_channels: int, num_experts: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, size, 1, bias=False)
        self.bn = nn.BatchNorm2d(size)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(size, num_experts)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(features)))), 1))


class MixtureOfExperts(nn.Module):
    def __init__(
        self,
        gate: nn.Module,
        experts: list[nn.Module],
        top_k: int,
        balance_weight: float = 0.01,
        routing: str = DEFAULT_ROUTING,
        class_to_expert: list[int] | None = None,
        gate_loss_weight: float = 1.0,
        views: int = 1,
    ) -> None:
        super().__init__()
        self.views = symmetry.check_views(views, "views")
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.balance_weight = balance_weight
        self.routing = routing
        self.class_to_expert = class_to_expert
        self.gate_loss_weight = gate_loss_weight
        self._auxiliary = torch.zeros(())
        self._gate_logits: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def idle_parts(self) -> tuple[str, ...]:
        """Name prefixes of parts that never run: the gate of a one-expert MoE (it has one choice)."""
        return ("gate.",) if self.num_experts == 1 else ()

    def expert_input(self, images: torch.Tensor) -> torch.Tensor:
        """What the gate and the experts read for ``images``: the images themselves in this layout."""
        return images

    def gate_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The gate's scores (B, E) of ``images``."""
        return self.gate(self.expert_input(images))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate probabilities (B, E), chosen experts (B, k), combine weights (B, k)) of images ``x``."""
        return self._route(self.expert_input(x))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`route` on what the gate reads (the images, or the trunk's features)."""
        logits = self.gate(x)
        self._gate_logits = logits
        probabilities = F.softmax(logits.float(), dim=1)  # fp32 also under bf16 autocast
        top_values, top_index = probabilities.topk(self.top_k, dim=1)
        weights = top_values / top_values.sum(dim=1, keepdim=True).detach()
        if self.routing == "class-groups":
            weights = weights.detach()  # the gate learns only its routing target
        return probabilities, top_index, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.views > 1 and not self.training:
            # Test-time views: one batch of views x samples, each routed on its own; logits averaged.
            stacked = torch.cat(symmetry.views(x, self.views))
            return self._routed(stacked).view(self.views, x.shape[0], -1).mean(dim=0)
        return self._routed(x)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_experts == 1:
            # A gate with one choice decides nothing: skip it (no gate MACs, no gate latency).
            self.last_routing = torch.zeros(x.shape[0], 1, dtype=torch.long)
            self._auxiliary = torch.zeros(())
            return self.experts[0](x)
        probabilities, top_index, weights = self._route(x)
        self.last_routing = top_index.detach()
        output = None
        for expert_id, expert in enumerate(self.experts):
            rows, slots = (top_index == expert_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            if rows.numel() == 1 and self.training:
                # BatchNorm cannot normalize a batch of one in training; run it in eval mode for that call.
                expert.eval()
                expert_out = expert(x[rows])
                expert.train()
            else:
                expert_out = expert(x[rows])
            contribution = (expert_out * weights[rows, slots].unsqueeze(1)).float()  # bf16 under autocast
            if output is None:
                output = x.new_zeros(x.shape[0], expert_out.shape[1], dtype=torch.float32)
            output = output.index_add(0, rows, contribution)
        if self.training and self.balance_weight > 0 and self.routing == "learned":
            fraction = F.one_hot(top_index[:, 0], self.num_experts).float().mean(dim=0)
            self._auxiliary = (
                self.balance_weight * self.num_experts * (fraction * probabilities.mean(dim=0)).sum()
            )
        else:
            self._auxiliary = torch.zeros(())
        return output

    def auxiliary_loss(self, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The extra loss of the last training forward pass (``train`` adds it): the load-balancing term
        (learned routing) or the gate's cross-entropy on the class groups (class-groups routing)."""
        if (
            self.training
            and self.routing == "class-groups"
            and labels is not None
            and self.class_to_expert is not None
            and self._gate_logits is not None
            and self.num_experts > 1
        ):
            targets = torch.as_tensor(self.class_to_expert, device=labels.device)[labels]
            return self.gate_loss_weight * F.cross_entropy(self._gate_logits.float(), targets)
        return self._auxiliary


def build_moe(
    expert: nn.Module | Sequence[nn.Module], in_channels: int, cfg: MoEConfig, seed: int = 0
) -> MixtureOfExperts:
    """``cfg.num_experts`` experts behind a new gate of ``cfg.gate_size`` channels: deep copies of ``expert``,
    or of a list of experts taken in turn (expert i is a copy of ``expert[i mod len]``)."""
    torch.manual_seed(seed)
    models = [expert] if isinstance(expert, nn.Module) else list(expert)
    if cfg.layout == "shared":
        if len(models) != 1:
            raise ConfigError(
                f"moe.layout: 'shared' splits ONE compressed network into trunk and experts, but {len(models)} "
                "different networks were given (expert_init: teachers). Use expert_init: copies."
            )
        return build_shared_moe(models[0], cfg)
    gate = Gate(in_channels, cfg.num_experts, cfg.gate_size)
    experts = [copy.deepcopy(models[index % len(models)]) for index in range(cfg.num_experts)]
    return MixtureOfExperts(
        gate,
        experts,
        cfg.top_k,
        cfg.balance_weight,
        cfg.routing,
        gate_loss_weight=cfg.gate_loss_weight,
        views=cfg.views,
    )


class SharedTrunkMoE(MixtureOfExperts):
    """A Mixture-of-Experts over one trunk: the trunk runs once per input (and view), the gate and the
    chosen experts read its feature map. Training, routing and views behave as in the separate layout."""

    def __init__(
        self, trunk: nn.Module, gate: nn.Module, experts: list[nn.Module], top_k: int, split_at: int, **kwargs
    ) -> None:
        super().__init__(gate, experts, top_k, **kwargs)
        self.trunk = trunk
        self.split_at = split_at

    def expert_input(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's feature map of ``images``."""
        return self.trunk(images)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        return super()._routed(self.trunk(x))


def build_shared_moe(model: nn.Module, cfg: MoEConfig) -> SharedTrunkMoE:
    """Split a (pruned) ``model`` at ``cfg.split_at``: one trunk (its first stages, pruned channels kept),
    a :class:`TrunkGate` of ``cfg.gate_size`` channels, and ``cfg.num_experts`` copies of the later stages."""
    trunk, tail = stages.split_model(copy.deepcopy(model), cfg.split_at)
    gate = TrunkGate(stages.output_channels(trunk), cfg.num_experts, cfg.gate_size)
    return SharedTrunkMoE(
        trunk,
        gate,
        [copy.deepcopy(tail) for _ in range(cfg.num_experts)],
        cfg.top_k,
        cfg.split_at,
        balance_weight=cfg.balance_weight,
        routing=cfg.routing,
        gate_loss_weight=cfg.gate_loss_weight,
        views=cfg.views,
    )


def class_groups(
    labels: torch.Tensor, num_classes: int, num_experts: int, similarity: torch.Tensor | None = None
) -> list[int]:
    """Assign each class to an expert; returns the expert id of each class.

    Without ``similarity``: experts get about equal numbers of training samples (largest classes first,
    each to the currently lightest expert). With a (C, C) ``similarity`` (e.g. how much probability the
    teacher gives class j on samples of class i): agglomerative grouping that merges the most similar
    groups first while no group exceeds 1.25x the fair share of samples, so confusable classes share an
    expert and experts stay balanced.
    """
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if similarity is None or num_experts == 1 or num_experts >= num_classes:
        load = [0] * num_experts
        assignment = [0] * num_classes
        for cls in sorted(range(num_classes), key=lambda c: -counts[c]):
            target = min(range(num_experts), key=lambda e: load[e])
            assignment[cls] = target
            load[target] += counts[cls]
        return assignment
    capacity = 1.25 * sum(counts) / num_experts
    symmetric = (similarity + similarity.T) / 2
    groups = [[cls] for cls in range(num_classes)]
    while len(groups) > num_experts:
        best, best_score = None, -1.0
        for first in range(len(groups)):
            for second in range(first + 1, len(groups)):
                mass = sum(counts[c] for c in groups[first] + groups[second])
                if mass > capacity:
                    continue
                score = float(symmetric[groups[first]][:, groups[second]].mean())
                if score > best_score:
                    best, best_score = (first, second), score
        if best is None:  # nothing fits under the cap: merge the two lightest groups
            order = sorted(range(len(groups)), key=lambda g: sum(counts[c] for c in groups[g]))
            best = (min(order[:2]), max(order[:2]))
        first, second = best
        groups[first] = groups[first] + groups.pop(second)
    groups.sort(key=lambda group: min(group))
    assignment = [0] * num_classes
    for expert_id, group in enumerate(groups):
        for cls in group:
            assignment[cls] = expert_id
    return assignment


@torch.no_grad()
def teacher_similarity(teacher: nn.Module, data: Split, num_classes: int) -> torch.Tensor:
    """(C, C): mean teacher probability of class j over samples of class i (its confusions)."""
    teacher.eval()
    totals = torch.zeros(num_classes, num_classes)
    for images, labels in data.batches(512):
        totals.index_add_(0, labels, F.softmax(teacher(images), dim=1))
    counts = torch.bincount(data.labels, minlength=num_classes).clamp(min=1).unsqueeze(1)
    similarity = totals / counts
    similarity.fill_diagonal_(0)
    return similarity


def warm_start_gate(
    moe: MixtureOfExperts,
    data: Split,
    num_classes: int,
    epochs: float = 1.0,
    seed: int = 0,
    teacher: nn.Module | None = None,
    augment: str = "flips",
) -> list[int]:
    """Choose the class groups (confusion-aware when a ``teacher`` is given) and train the gate alone
    (on ``augment``-ed batches) to send each group to its expert. Sets ``moe.class_to_expert``; returns it."""
    similarity = teacher_similarity(teacher, data, num_classes) if teacher is not None else None
    assignment = class_groups(data.labels, num_classes, moe.num_experts, similarity)
    moe.class_to_expert = assignment
    if moe.num_experts == 1:
        return assignment
    target_of = torch.tensor(assignment)
    optimizer = torch.optim.Adam(moe.gate.parameters(), lr=3e-3)
    generator_seed = seed
    steps = max(1, int(epochs * (len(data) // 128 + 1)))
    moe.eval()  # the trunk (shared layout) keeps its BatchNorm statistics; only the gate learns here
    moe.gate.train()
    done = 0
    while done < steps:
        for images, labels in data.batches(128, shuffle=True, augment=augment, seed=generator_seed):
            with torch.no_grad():
                inputs = moe.expert_input(images)
            loss = F.cross_entropy(moe.gate(inputs), target_of[labels])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
        generator_seed += 1
    moe.gate.eval()
    return assignment


@torch.no_grad()
def routing_table(moe: MixtureOfExperts, data: Split, num_classes: int) -> torch.Tensor:
    """(num_classes, num_experts) counts of where each class's samples were routed (first choice)."""
    moe.eval()
    table = torch.zeros(num_classes, moe.num_experts, dtype=torch.long)
    for images, labels in data.batches(512):
        _, top_index, _ = moe.route(images)
        table.index_put_((labels, top_index[:, 0]), torch.ones_like(labels), accumulate=True)
    return table


def moe_description(
    model: ModelSpec,
    in_channels: int,
    num_classes: int,
    image_size: int,
    moe: MixtureOfExperts,
    gate_size: int,
) -> dict:
    """What :func:`rebuild_moe` needs besides the layer shapes and weights: the experts' ``model`` spec and
    the dataset shape they were built for, and the MoE's own settings."""
    from pipelines.serialize import describe_model

    return {
        **describe_model(model, in_channels, num_classes, image_size),
        "kind": "moe",
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "gate_size": gate_size,
        "balance_weight": moe.balance_weight,
        "routing": moe.routing,
        "class_to_expert": moe.class_to_expert,
        "views": moe.views,
        "layout": "shared" if isinstance(moe, SharedTrunkMoE) else DEFAULT_LAYOUT,
        **({"split_at": moe.split_at} if isinstance(moe, SharedTrunkMoE) else {}),
    }


def rebuild_moe(description: dict, layers: dict, state: dict) -> MixtureOfExperts:
    """Rebuild a (pruned) MoE from a checkpoint written with ``serialize.save_checkpoint``."""
    from pipelines.serialize import build_described, resize_layers

    if description.get("layout", DEFAULT_LAYOUT) == "shared":
        cfg = MoEConfig(
            num_experts=description["num_experts"],
            top_k=description["top_k"],
            gate_size=description["gate_size"],
            balance_weight=description["balance_weight"],
            routing=description["routing"],
            views=description["views"],
            layout="shared",
            split_at=description["split_at"],
        )
        moe = build_shared_moe(build_described(description), cfg)
        moe.class_to_expert = description["class_to_expert"]
        resize_layers(moe, layers)
        moe.load_state_dict(state)
        return moe.eval()
    experts = [build_described(description) for _ in range(description["num_experts"])]
    gate = Gate(description["in_channels"], description["num_experts"], description["gate_size"])
    moe = MixtureOfExperts(
        gate,
        experts,
        description["top_k"],
        description["balance_weight"],
        description["routing"],
        description["class_to_expert"],
        views=description["views"],
    )
    resize_layers(moe, layers)
    moe.load_state_dict(state)
    return moe.eval()
