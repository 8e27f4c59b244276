"""Group expert training (``moe.expert_training: group``): each expert learns only its class group.

Instead of training the MoE end to end on what the gate routes, every expert is distilled alone on the
training images whose label belongs to its group (``MixtureOfExperts.class_to_expert``, chosen by
:func:`pipelines.moe.warm_start_gate`): hard routing by label, so an expert specializes without the gate's
mistakes in its data. The gate keeps its warm start; in the shared layout the trunk is frozen (weights and
BatchNorm statistics) so the features the gate learned on stay the same.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipelines.data import Split
from pipelines.errors import ConfigError
from pipelines.moe import MixtureOfExperts
from pipelines.train import TrainConfig, TrainReport, train

__all__ = ["group_rows", "train_on_groups"]

log = logging.getLogger(__name__)


class _ExpertOnInput(nn.Module):
    """One expert behind the MoE's frozen input path (the trunk in the shared layout, nothing in the
    separate one): only the expert is registered, so ``train`` optimizes and switches modes of it alone."""

    def __init__(self, moe: MixtureOfExperts, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert
        self._moe = (moe,)  # a tuple: not a submodule, so neither its parameters nor its mode are touched

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self._moe[0].expert_input(images)
        return self.expert(features)


def group_rows(labels: torch.Tensor, class_to_expert: list[int], expert: int) -> torch.Tensor:
    """Indices of the samples whose label belongs to ``expert``'s class group."""
    groups = torch.as_tensor(class_to_expert, dtype=torch.long)
    if labels.numel() and int(labels.max()) >= len(groups):
        raise ConfigError(
            f"class_to_expert: {len(groups)} classes assigned, but the data has label {int(labels.max())}; "
            "warm-start the gate on this dataset first."
        )
    return torch.nonzero(groups[labels] == expert).flatten()


def train_on_groups(
    moe: MixtureOfExperts, data: Split, cfg: TrainConfig, teacher: nn.Module | None = None
) -> list[TrainReport | None]:
    """Train each expert of ``moe`` with ``cfg`` (its epochs over its own rows) on its class group's rows of
    ``data`` only, distilled from ``data.teacher_logits`` or ``teacher``. The gate and the trunk (shared
    layout) are left untouched. An expert whose group has fewer than 2 rows is left as it is (``None``)."""
    if moe.class_to_expert is None:
        raise ConfigError(
            "moe.expert_training: 'group' trains each expert on its class group, but the MoE has no class "
            "groups; warm-start the gate (pipelines.moe.warm_start_gate) first."
        )
    moe.eval()  # the trunk and the gate keep their BatchNorm statistics (the wrapper trains the expert only)
    reports: list[TrainReport | None] = []
    for index, expert in enumerate(moe.experts):
        rows = group_rows(data.labels, moe.class_to_expert, index)
        if len(rows) < 2:
            log.info("group training: expert %d has %d training rows; left as it is", index, len(rows))
            reports.append(None)
            continue
        logits = None if data.teacher_logits is None else data.teacher_logits[rows]
        group = Split(data.images[rows], data.labels[rows], logits)
        reports.append(train(_ExpertOnInput(moe, expert), group, cfg, teacher))
    moe.eval()
    return reports
