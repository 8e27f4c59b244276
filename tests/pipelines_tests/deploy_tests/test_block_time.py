"""pipelines.deploy.block_time: each removable block's share of the deployed int8 model's latency, timed
interleaved against the whole model; the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from pipelines.compress.depth import RemovedBlock, removable_blocks
from pipelines.deploy.block_time import MIN_SHARE, block_time_shares
from pipelines.errors import ConfigError
from pipelines.models import ResNet


def _model() -> ResNet:
    torch.manual_seed(0)
    model = ResNet([3, 2], [8, 16], 3, 4).train()
    with torch.no_grad():
        model(torch.randn(32, 3, 16, 16))  # BatchNorm statistics of the inputs: realistic int8 ranges
    return model.eval()


def test_every_removable_block_gets_a_share_and_the_model_is_untouched() -> None:
    model, images = _model(), torch.randn(16, 3, 16, 16)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    shares = block_time_shares(model, images, batch=4, rounds=3, calls_per_round=5)
    assert (
        list(shares)
        == removable_blocks(model, images[:1])
        == ["layers.0.0", "layers.0.1", "layers.0.2", "layers.1.1"]
    )
    assert all(MIN_SHARE <= share < 1.0 for share in shares.values())
    # three 8-channel 16x16 blocks and one 16-channel 8x8 block: removing one leaves most of the time
    assert sum(shares.values()) < 1.0
    assert not any(isinstance(module, RemovedBlock) for module in model.modules())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_model_without_removable_blocks_has_no_shares_and_bad_settings_fail() -> None:
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    images = torch.randn(4, 3, 8, 8)
    plain(images)
    assert block_time_shares(plain.eval(), images) == {}
    with pytest.raises(ConfigError, match="batch and rounds must be >= 1"):
        block_time_shares(_model(), images, batch=0)
