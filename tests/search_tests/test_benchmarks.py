"""The benchmark scripts' arithmetic (the scripts themselves run for minutes and write reports)."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from search.benchmarks.samplers import accuracy_macs_hypervolume, hypervolume_at
from tests.helpers import recorded


def _study(points: list[tuple[float, float, float]], repeat_of_first: bool = False) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for index, values in enumerate(points):
        attrs = recorded(repeat_of=0 if repeat_of_first and index == len(points) - 1 else None)
        study.add_trial(
            create_trial(
                values=list(values),
                params={"pruner": "l1"},
                distributions={"pruner": CategoricalDistribution(["l1"])},
                user_attrs=attrs,
            )
        )
    return study


def test_accuracy_macs_hypervolume_is_the_dominated_area() -> None:
    # reference (accuracy 0, 20 MMACs): (0.9, 10) dominates 0.9 x 10; (0.5, 5) adds 0.5 x 5 more
    study = _study([(0.9, 10.0, 1.0), (0.5, 5.0, 1.0)])
    assert accuracy_macs_hypervolume(study, [0.0, 20.0, 9.0]) == pytest.approx(0.9 * 10 + 0.5 * 5)


def test_points_beyond_the_reference_add_nothing_and_repeats_change_nothing() -> None:
    study = _study([(0.9, 10.0, 1.0), (0.99, 30.0, 1.0), (0.9, 10.0, 1.0)], repeat_of_first=True)
    assert accuracy_macs_hypervolume(study, [0.0, 20.0, 9.0]) == pytest.approx(9.0)


def test_train_step_benchmark_reports_both_precisions(tmp_path) -> None:
    from search.benchmarks.train_step import run

    threads = torch.get_num_threads()
    out = run("resnet8", [0.25], batch=8, threads=1, repeats=2, out=tmp_path / "train_step.md")
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    text = out.read_text()
    assert "| resnet8 | 0.25 | fp32 |" in text and "| resnet8 | 0.25 | bf16 |" in text
    assert "batch 8" in text and "1 thread(s)" in text
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [row["precision"] for row in rows] == ["fp32", "bf16"]
    assert all(row["median_ms"] > 0 and row["batch"] == 8 for row in rows)
    assert rows[1]["speedup"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])


def test_hypervolume_at_counts_only_trials_finished_by_the_mark() -> None:
    import datetime

    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for values, finished in (((0.5, 5.0, 1.0), 10), ((0.9, 10.0, 1.0), 100)):
        trial = create_trial(
            values=list(values),
            params={"pruner": "l1"},
            distributions={"pruner": CategoricalDistribution(["l1"])},
        )
        trial.datetime_start = start
        trial.datetime_complete = start + datetime.timedelta(seconds=finished)
        study.add_trial(trial)
    trials = study.get_trials()
    reference = [0.0, 20.0, 2.0]
    # by 60 s only (0.5, 5, 1) is in: 0.5 x 15 x 1
    assert hypervolume_at(trials, reference, 60.0) == pytest.approx(0.5 * 15 * 1)
    # by the end both: the union of the two boxes 0.5 x 15 x 1 and 0.9 x 10 x 1 overlapping in 0.5 x 10 x 1
    assert hypervolume_at(trials, reference, None) == pytest.approx(7.5 + 9.0 - 5.0)
    assert hypervolume_at(trials, reference, 5.0) == 0.0


def test_search_speed_reads_the_front_of_a_report_and_measures_it(tmp_path) -> None:
    from search.benchmarks.search_speed import front_points, hypervolumes

    report = tmp_path / "report.md"
    report.write_text(
        "# study\n\n## Pareto front\n\n| trial | val_accuracy | mmacs | latency_ms | bits |\n|---|---|---|---|---|\n"
        "| 3 | 0.95 | 5.0 | 0.5 | 8 |\n| 7 | 0.9 | 2.0 | 0.25 | 4 |\n\nLatency: ...\n"
    )
    points = front_points(report)
    assert points == [(0.95, 5.0, 0.5), (0.9, 2.0, 0.25)]
    three, two = hypervolumes(points, [0.85, 10.0, 1.0])
    # (acc, MMACs): 0.10 x 5 + 0.05 x 3 (the second point's extra width below 5 MMACs)
    assert two == pytest.approx(0.10 * 5 + 0.05 * 3)
    assert three == pytest.approx(0.10 * 5 * 0.5 + 0.05 * 8 * 0.75 - 0.05 * 5 * 0.5)
    (tmp_path / "empty.md").write_text("# nothing\n")
    with pytest.raises(Exception, match="Pareto front"):
        front_points(tmp_path / "empty.md")


def test_channel_multiple_benchmark_picks_the_sparsity_closest_to_the_macs_target() -> None:
    from pipelines.compress.prune import PruneConfig, prune
    from pipelines.measure import count_macs
    from pipelines.models import build_model
    from search.benchmarks.channel_multiple import SPARSITIES, sparsity_for_macs

    example = torch.randn(1, 3, 28, 28)
    teacher = build_model("resnet20", 3, 8)
    target = 0.4 * count_macs(teacher, example)
    sparsity, macs = sparsity_for_macs(target, 8, example)
    assert sparsity in SPARSITIES and abs(macs - target) < 0.1 * target
    # the shortcut count (stage widths kept by the multiple rule) is what NNI's pruning really gives
    pruned = prune(
        teacher, PruneConfig(sparsity=sparsity, channel_multiple=8), example.repeat(2, 1, 1, 1)
    ).model
    assert count_macs(pruned, example) == macs


def test_study_latency_comparisons_can_fail() -> None:
    from search.benchmarks.study_latency import error_summary, spearman

    assert spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    summary = error_summary([1.05, 2.0, 3.6], [1.0, 2.0, 3.0])  # 5%, 0%, 20%
    assert summary["predicted_mape"] == pytest.approx((0.05 + 0.0 + 0.2) / 3)
    assert summary["predicted_within_10pct"] == pytest.approx(2 / 3)


def test_study_latency_compares_the_throughput_batch_and_counts_sides_of_the_limit() -> None:
    """Each model's search-time ratio at its throughput batch beside the quiet one; the block ranks them and
    counts the models on the same side of the latency-per-MAC limit both times (one crosses it here)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from search.benchmarks.study_latency import _batch_block, _batch_columns, _batch_lines
    from tests.helpers import made_up_record

    rows = []
    for search, quiet in ((0.40, 0.41), (0.50, 0.52), (0.62, 0.58), (0.70, 0.75)):
        record = made_up_record()
        measured = replace(
            record.measurement, batch_latency_ratio=search, batch_latency={"batch": 64}, macs_ratio=0.4
        )
        rows.append(_batch_columns(replace(record, measurement=measured), {64: SimpleNamespace(ratio=quiet)}))
    assert rows[2] == {
        "batch": 64, "search_batch_ratio": 0.62, "quiet_batch_ratio": 0.58,
        "search_latency_per_mac": pytest.approx(1.55), "quiet_latency_per_mac": pytest.approx(1.45),
    }  # fmt: skip
    block = _batch_block(rows, 1.5)
    assert block["spearman_batch_search_vs_quiet"] == pytest.approx(1.0) and block["batch_models"] == 4
    assert block["latency_per_mac_same_side"] == 3 and block["latency_per_mac_within_quiet"] == 3
    assert "**1.000** over 4 models; 3 of them on the same side" in _batch_lines(block)[0]
    assert _batch_columns(made_up_record(), {64: SimpleNamespace(ratio=0.5)}) == {}  # timed at batch 1 only
    assert _batch_block([], None) == {} and _batch_lines({}) == []


def test_expert_training_table_shows_each_mode_and_the_studys_numbers() -> None:
    from search.benchmarks.expert_training import table

    stored = {"finetuned": 0.97, "moe": 0.969, "quantized": 0.968}
    rows = [
        {"trial": 27, "layout": "shared", "expert_training": mode, **values, "stored": stored, "seconds": 1.0}
        for mode, values in (
            (
                "joint",
                {
                    "finetuned": 0.97,
                    "moe": 0.9696,
                    "quantized": 0.9679,
                    "routed_to_group": 0.95,
                    "oracle": 0.98,
                },
            ),
            (
                "group",
                {
                    "finetuned": 0.97,
                    "moe": 0.9712,
                    "quantized": 0.9701,
                    "routed_to_group": 0.9,
                    "oracle": 0.99,
                },
            ),
        )
    ]
    rows.append({**rows[1], "layout": "separate", "stored": {}})
    lines = table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert (
        lines[2] == "| 27 | shared | joint | 0.9700 | 0.9696 | 0.9679 | 0.9500 | 0.9800 | 0.9690 / 0.9680 |"
    )
    assert lines[3].startswith("| 27 | shared | group |") and lines[4].endswith("| - |")


def test_routing_diagnostics_of_a_perfectly_routed_moe() -> None:
    """A gate that routes by the image's label group: everything routed to its group, and the oracle
    accuracy is that of the experts on their own groups."""
    from torch import nn

    from pipelines.data import Split
    from pipelines.moe import MixtureOfExperts
    from search.benchmarks.expert_training import routing_diagnostics

    class LabelGate(nn.Module):  # pixel value = label; labels 0, 1 -> expert 0, label 2 -> expert 1
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot((images[:, 0, 0, 0] >= 2).long(), 2).float() * 10

    class Constant(nn.Module):  # always predicts one class
        def __init__(self, label: int) -> None:
            super().__init__()
            self.label = label

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(torch.full((len(images),), self.label), 3).float()

    moe = MixtureOfExperts(LabelGate(), [Constant(0), Constant(2)], top_k=1, class_to_expert=[0, 0, 1])
    labels = torch.tensor([0, 0, 1, 2])
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    assert routing_diagnostics(moe, Split(images, labels)) == {"routed_to_group": 1.0, "oracle": 0.75}


def test_routing_share_benchmark_counts_models_within_the_limit() -> None:
    from search.benchmarks.routing_share import _against, _markdown, _summary

    def row(trial: int, mmacs: float, share: float, engine: str = "onnxruntime") -> dict:
        return {
            "trial": trial, "layout": "shared", "num_experts": 2, "top_k": 1, "views": 1, "mmacs": mmacs,
            "val_accuracy": 0.97, "engine": engine, "version": "1.0", "threads": 1, "batch": 1, "min_ms": 0.1,
            "median_ms": 0.12, "network_min_ms": 0.09, "network_median_ms": 0.1, "calls": 2,
            "routing_share": share, "routing_share_min": share, "search_routing_share": None,
            "search_routing_share_of": "model.onnx",
        }  # fmt: skip

    rows = [row(1, 2.0, 0.30), row(2, 7.0, 0.15), row(3, 15.0, 0.08), row(3, 15.0, 0.25, "openvino")]
    summary = _summary(rows, 0.10)
    assert summary["onnxruntime"]["models"] == 3 and summary["onnxruntime"]["within_limit"] == 1
    assert summary["onnxruntime"]["spearman_share_vs_mmacs"] == pytest.approx(-1.0)  # larger: cheaper routing
    assert summary["openvino"]["within_limit"] == 0
    text = _markdown(
        {"study": "s", "date": "d", "cpu": "c", "repeats": 150, "rounds": 15, "max_routing_share": 0.1,
         "summary": summary, "rows": rows},
        "cmd",
    )  # fmt: skip
    assert "1 of 3 models within 10%" in text and "| 3 | shared | 2 | 1 | 1 | 15.00 |" in text
    # a busy run against a quiet one: trial 3 crossed the limit, the others kept their side
    busy = [row(1, 2.0, 0.32), row(2, 7.0, 0.16), row(3, 15.0, 0.11)]
    against = _against(busy, {"rows": rows}, 0.10)["onnxruntime"]
    assert against["models"] == 3 and against["same_side_of_limit"] == pytest.approx(2 / 3)
    assert against["mean_difference"] == pytest.approx(0.02) and against[
        "max_abs_difference"
    ] == pytest.approx(0.03)
    assert against["spearman"] == pytest.approx(1.0)


def test_block_choice_removes_the_named_blocks_and_refuses_others() -> None:
    """Early and late removal of four blocks leave the same MACs (what the benchmark compares at)."""
    import torch

    from pipelines.compress.depth import RemovedBlock
    from pipelines.measure import count_macs
    from pipelines.models import build_model
    from search.benchmarks.block_choice import EARLY, LATE, build

    teacher = build_model("resnet20", 3, 8).eval()
    images = torch.randn(4, 3, 28, 28)
    early, late = build(teacher, EARLY, 0.0, images), build(teacher, LATE, 0.0, images)
    assert all(isinstance(early.get_submodule(name), RemovedBlock) for name in EARLY)
    assert not any(isinstance(teacher.get_submodule(name), RemovedBlock) for name in EARLY)  # a copy
    assert count_macs(early, images[:1]) == count_macs(late, images[:1]) < count_macs(teacher, images[:1])
    with pytest.raises(ValueError, match=r"layers\.1\.0 is not a removable block"):
        build(teacher, ("layers.1.0",), 0.0, images)  # it halves the resolution: no identity shortcut
