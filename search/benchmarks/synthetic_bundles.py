"""Random-weight int8 MoE bundles of pruned BloodMNIST-shaped ResNet-20s (1-4 experts, top-1/2, views 1/2) for
validating the latency model: timing needs the deployed graphs, not trained weights.

    python -m search.benchmarks.synthetic_bundles /tmp/lm/bundles
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipelines.compress.prune import PruneConfig, prune
from pipelines.deploy.bundle import deploy_moe
from pipelines.models import build_model
from pipelines.moe import MoEConfig, build_moe

# (prune sparsity, experts, top_k, views)
CONFIGS = (
    (0.0, 1, 1, 1),
    (0.5, 1, 1, 1),
    (0.75, 1, 1, 1),
    (0.5, 1, 1, 2),
    (0.5, 2, 1, 1),
    (0.75, 2, 2, 1),
    (0.0, 2, 1, 2),
    (0.5, 3, 1, 1),
    (0.75, 3, 2, 2),
    (0.5, 4, 1, 1),
    (0.75, 4, 2, 1),
    (0.5, 4, 2, 2),
    (0.75, 4, 1, 2),
    (0.0, 4, 2, 1),
)


def build_bundles(folder: Path, configs=CONFIGS, shape=(3, 28, 28), classes: int = 8) -> list[Path]:
    """One bundle per config under ``folder/s<sparsity>-e<experts>-k<top_k>-v<views>/bundle``."""
    torch.manual_seed(0)
    example = torch.randn(4, *shape)
    teacher = build_model("resnet20", shape[0], classes)
    experts = {
        sparsity: prune(teacher, PruneConfig(sparsity, channel_multiple=8), example).model
        if sparsity
        else teacher
        for sparsity in sorted({config[0] for config in configs})
    }
    calibration = torch.randn(16, *shape)
    written = []
    for sparsity, num_experts, top_k, views in configs:
        moe = build_moe(
            experts[sparsity], shape[0], MoEConfig(num_experts=num_experts, top_k=top_k, views=views)
        )
        bundle = Path(folder) / f"s{int(sparsity * 100)}-e{num_experts}-k{top_k}-v{views}" / "bundle"
        deploy_moe(moe, bundle, calibration, int8=True)
        written.append(bundle)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    for bundle in build_bundles(args.folder):
        print(bundle)


if __name__ == "__main__":
    main()
