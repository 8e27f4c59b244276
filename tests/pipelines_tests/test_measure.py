"""pipelines.measure: MACs by hand formula, MoE MACs, packed size in exact bytes, the latency harness."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.measure import count_macs, count_params, packed_size_bytes, torch_runner
from pipelines.models import ModelSpec, build_model
from pipelines.moe import MoEConfig, build_moe
from pipelines.timing import LatencyStats, measure_latency


@pytest.mark.parametrize(
    ("conv", "size"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), 10),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), 9),
        (nn.Conv2d(4, 8, 5, groups=2), 12),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6), 7),  # depthwise
        (nn.Conv2d(5, 7, 1), 6),
    ],
)
def test_conv_macs_match_the_formula(conv: nn.Conv2d, size: int) -> None:
    example = torch.randn(4, conv.in_channels, size, size)
    out_size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    expected = (
        conv.out_channels * out_size * out_size * (conv.in_channels // conv.groups) * conv.kernel_size[0] ** 2
    )
    assert count_macs(conv, example) == expected


def test_linear_macs_match_the_formula() -> None:
    assert count_macs(nn.Linear(10, 5), torch.randn(3, 10)) == 50


def test_model_macs_agree_with_torch_flop_counter() -> None:
    model = build_model("resnet8", 3, 8, 0.5).eval()
    example = torch.randn(2, 3, 28, 28)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    # FlopCounterMode counts FLOPs = 2 x MACs of convs and matmuls over the whole batch.
    assert count_macs(model, example) == counter.get_total_flops() // 2 // 2


FAMILY_SPECS = [
    ModelSpec("torchvision:resnet18", small_input=True),
    ModelSpec("torchvision:resnet50", small_input=False),
    ModelSpec("torchvision:vgg11_bn", small_input=True),
    ModelSpec("torchvision:mobilenet_v2", small_input=True, kwargs={"width_mult": 0.25}),
    ModelSpec("torchvision:mobilenet_v3_small", small_input=True, kwargs={"width_mult": 0.25}),
    ModelSpec("torchvision:efficientnet_b0", small_input=False),
    ModelSpec("tests.pipelines_tests.user_model:build_net"),
    ModelSpec("tests.pipelines_tests.user_model:GroupedNet"),
]


@pytest.mark.parametrize("spec", FAMILY_SPECS, ids=lambda spec: spec.arch.rpartition(":")[2])
def test_every_family_counts_every_conv_and_linear(spec: ModelSpec) -> None:
    """Depthwise, grouped, squeeze-excite 1x1 convs and Linear layers: torch's own FLOP counter
    (2 x MACs of every conv and matmul it dispatches) agrees, and packed size covers every weight."""
    model = spec.build(3, 8, 28).eval()
    example = torch.randn(2, 3, 28, 28)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    assert count_macs(model, example) == counter.get_total_flops() // 2 // 2
    # fp32 packed size: every weight of the state_dict (matrices and kernels), 4 bytes, plus one fp32 bias
    # per output channel of each conv / linear.
    weights = [
        value for key, value in model.state_dict().items() if key.endswith("weight") and value.ndim >= 2
    ]
    assert packed_size_bytes(model, 32) == 4 * sum(weight.numel() + weight.shape[0] for weight in weights)
    assert packed_size_bytes(model, 8) == sum(weight.numel() + 8 * weight.shape[0] for weight in weights)


def test_count_macs_leaves_the_model_as_it_was() -> None:
    model = build_model("resnet8", 3, 8, 0.5).train()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    count_macs(model, torch.randn(2, 3, 28, 28))
    assert model.training
    assert all(not module._forward_hooks for module in model.modules())
    # Measured in eval mode: BatchNorm running statistics are untouched.
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_macs_are_gate_plus_top_k_experts(top_k: int) -> None:
    expert = build_model("resnet8", 3, 8, 0.5)
    moe = build_moe(expert, 3, MoEConfig(num_experts=3, top_k=top_k, gate_size=8))
    example = torch.randn(16, 3, 28, 28)
    gate_macs = count_macs(moe.gate, example)
    expert_macs = count_macs(expert, example)
    assert gate_macs > 0
    assert count_macs(moe, example) == gate_macs + top_k * expert_macs


def test_count_params() -> None:
    assert count_params(nn.Linear(10, 5)) == 55
    assert count_params(nn.Conv2d(2, 4, 3, bias=False)) == 72


def _tiny_model() -> nn.Module:
    # Conv: 4*2*3*3 = 72 weights, 4 output channels. Linear: 3*16 = 48 weights, 3 outputs.
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    ("bits", "expected_bytes"),
    [
        (32, (72 + 48) * 4 + (4 + 3) * 4),  # fp32 weights + one bias per output channel
        (8, (72 + 48) * 1 + (4 + 3) * 4 * 2),  # + one fp32 scale per output channel
        (4, (72 + 48) // 2 + (4 + 3) * 4 * 2),  # two 4-bit weights per byte
        (3, (72 + 48) * 3 // 8 + (4 + 3) * 4 * 2),
    ],
)
def test_packed_size_exact_bytes(bits: int, expected_bytes: int) -> None:
    assert packed_size_bytes(_tiny_model(), bits) == expected_bytes


def test_packed_size_orders_and_per_layer_bits() -> None:
    model = _tiny_model()
    sizes = [packed_size_bytes(model, bits) for bits in (2, 4, 8, 32)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    mixed = packed_size_bytes(model, lambda name: 4 if name == "0" else 8)
    assert mixed == 72 // 2 + 48 + (4 + 3) * 4 * 2
    assert packed_size_bytes(model, 4) < mixed < packed_size_bytes(model, 8)


def test_packed_size_rounds_up_to_whole_bytes() -> None:
    layer = nn.Linear(3, 1, bias=False)  # 3 weights at 3 bits = 9 bits + 64 bits of scale and bias
    assert packed_size_bytes(layer, 3) == 10


def test_measure_latency_reports_spread_and_context() -> None:
    calls = []
    stats = measure_latency(
        lambda: calls.append(1), backend="dummy", threads=2, batch=4, warmup=3, repeats=20
    )
    assert isinstance(stats, LatencyStats)
    assert len(calls) == 3 + 20 and stats.repeats == 20 and stats.warmup == 3
    assert 0 <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert (stats.backend, stats.threads, stats.batch) == ("dummy", 2, 4)
    assert stats.label() == "dummy, 2 thread(s), batch 4"
    assert "torch" in stats.versions and "python" in stats.versions
    # the CPU is named with its core count (and, on Linux, its int8-relevant instruction sets)
    assert stats.versions["cpu"].endswith(f"{os.cpu_count()} logical cores")
    assert stats.as_dict()["backend"] == "dummy"


def test_measure_latency_median_of_a_known_workload() -> None:
    import time

    stats = measure_latency(
        lambda: time.sleep(0.002), backend="sleep", threads=1, batch=1, warmup=1, repeats=15
    )
    assert 2.0 <= stats.median_ms < 50.0
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms


def test_measure_latency_min_seconds_adds_repeats() -> None:
    stats = measure_latency(
        lambda: None, backend="noop", threads=1, batch=1, warmup=0, repeats=1, min_seconds=0.02
    )
    assert stats.repeats > 1


@pytest.mark.parametrize(("warmup", "repeats"), [(0, 0), (-1, 5)])
def test_measure_latency_rejects_bad_counts(warmup: int, repeats: int) -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, backend="noop", threads=1, batch=1, warmup=warmup, repeats=repeats)


def test_torch_runner_fixes_threads_and_restores_them() -> None:
    seen_threads = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen_threads.append(torch.get_num_threads())
            return x * 2

    before = torch.get_num_threads()
    run = torch_runner(Probe(), torch.ones(2), threads=1)
    output = run()
    assert seen_threads == [1]
    assert torch.get_num_threads() == before
    assert torch.equal(output, torch.full((2,), 2.0))
