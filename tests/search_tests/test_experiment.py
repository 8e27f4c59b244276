"""search.experiment: rows merged in seed order, saved pairs reused only for the same setup, longest first."""

from __future__ import annotations

import pytest


def test_experiment_merges_rows_in_seed_order_whatever_order_they_finished() -> None:
    from search.experiment import CONTROL, MOE, SINGLE, _merge

    def entry(row: str, seed: int, test: float) -> dict:
        views = {"test_one_view": [test - 0.01]} if row == MOE else {}  # a row that runs test-time views
        return {
            "row": row,
            "seed": seed,
            "test": [test],
            "latency_ms": [seed + 0.5],
            "mmacs": 10.0 + seed,
            **views,
        }

    finished = [entry(CONTROL, 2, 0.3), entry(MOE, 1, 0.2), entry(MOE, 0, 0.1), entry(CONTROL, 0, 0.5)]
    rows = _merge(finished, seeds=[0, 1, 2], names=[MOE, CONTROL], single_is=7)
    assert rows[MOE]["test"] == [0.1, 0.2] and rows[MOE]["latency_ms"] == [0.5, 1.5]
    assert rows[MOE]["test_one_view"] == pytest.approx([0.09, 0.19])
    assert rows[MOE]["mmacs"] == 10.0  # per-configuration figures from the first seed
    assert rows[CONTROL]["test"] == [0.5, 0.3] and "row" not in rows[CONTROL]
    assert rows[SINGLE]["test"] == rows[MOE]["test"] and rows[SINGLE]["note"] == "= the exported trial 7"
    assert list(rows) == [MOE, SINGLE, CONTROL]  # the control stays last
    assert SINGLE not in _merge(finished, seeds=[0, 1, 2], names=[MOE, CONTROL])


def test_experiment_routing_table_comes_from_the_first_seed_that_recorded_one() -> None:
    from search.experiment import _merge
    from search.export_report import routing_lines

    table = [[5, 0], [1, 7]]  # rows: classes, columns: experts
    finished = [
        {"row": "trial 6", "seed": 0, "test": [0.9], "routing_per_class": None},  # saved by an older version
        {"row": "trial 6", "seed": 2, "test": [0.8], "routing_per_class": [[0, 5], [7, 1]]},
        {"row": "trial 6", "seed": 1, "test": [0.7], "routing_per_class": table},
    ]
    row = _merge(finished, seeds=[0, 1, 2], names=["trial 6"])["trial 6"]
    assert row["routing_per_class"] == table and row["routing_seed"] == 1
    assert row["test"] == [0.9, 0.7, 0.8]
    finished[1]["seconds"], finished[0]["seconds"] = 600.0, 60.0
    finished[0]["from"] = "export/candidates/trial_6"  # measured, not trained: not a training time
    assert _merge(finished, seeds=[0, 1, 2], names=["trial 6"])["trial 6"]["seconds"] == [600.0]
    lines = routing_lines(table, ["basophil", "platelet"])
    assert lines[0] == "| class | expert 0 | expert 1 |" and lines[1] == "|---|---|---|"
    assert lines[2:] == ["| basophil | 5 | 0 |", "| platelet | 1 | 7 |"]
    assert routing_lines([], ["basophil"]) == []


def test_experiment_runs_the_pairs_that_train_longest_first() -> None:
    from search.config import parse_config
    from search.experiment import CONTROL, MOE, _longest_first

    tasks = [(MOE, 0), (MOE, 1), ("trial 6", 1), (CONTROL, 0), (CONTROL, 1)]
    cfg = parse_config({"baseline": {"epochs": 80}, "export": {"finetune_epochs": 24, "moe_epochs": 14}})
    assert _longest_first(tasks, cfg) == [(CONTROL, 0), (CONTROL, 1), (MOE, 0), (MOE, 1), ("trial 6", 1)]
    short_teacher = parse_config({"baseline": {"epochs": 10}, "export": {"finetune_epochs": 24}})
    assert _longest_first(tasks, short_teacher) == tasks  # compressed rows train more epochs here


def test_experiment_reuses_only_saved_results_of_the_same_row_seed_setup_and_configuration() -> None:
    from search.config import parse_config, setup_fingerprint
    from search.experiment import CONTROL, MOE, _reusable

    config = {"sparsity": 0.35, "num_experts": 1}
    cfg = parse_config({})
    setup = setup_fingerprint(cfg, "data")
    saved = [
        {"row": MOE, "seed": 0, "setup": setup, "params": config, "test": [0.9]},
        {"row": MOE, "seed": 1, "setup": setup, "params": {**config, "sparsity": 0.4}, "test": [0.8]},
        {"row": MOE, "seed": 2, "setup": setup, "params": config, "test": [0.7]},  # a seed not asked for
        {"row": CONTROL, "seed": 0, "setup": setup, "width": 0.656, "test": [0.6]},
        {"row": CONTROL, "seed": 1, "setup": setup, "width": 0.7, "test": [0.5]},  # another width
        {
            "row": MOE,
            "seed": 0,
            "setup": setup,
            "params": config,
            "test": [0.95],
        },  # a duplicate: first counts
        {"row": CONTROL, "seed": 1, "width": 0.656, "test": [0.4]},  # saved before setups were recorded
    ]
    tasks = [(MOE, 0), (MOE, 1), (CONTROL, 0), (CONTROL, 1)]
    kept = _reusable(saved, tasks, {MOE: config, CONTROL: 0.656}, setup)
    assert [(entry["row"], entry["seed"], entry["test"]) for entry in kept] == [
        (MOE, 0, [0.9]),
        (CONTROL, 0, [0.6]),
    ]
    assert _reusable(saved, tasks, {MOE: {**config, "bits": 4}, CONTROL: 0.5}, setup) == []
    # the same configuration under another channel multiple or full budget prunes or trains another model
    for changed in (cfg.replace(model={"channel_multiple": 4}), cfg.replace(export={"finetune_epochs": 30})):
        assert setup_fingerprint(changed, "data") != setup
        assert (
            _reusable(saved, tasks, {MOE: config, CONTROL: 0.656}, setup_fingerprint(changed, "data")) == []
        )
    assert (
        setup_fingerprint(cfg.replace(data={"root": "/elsewhere"}), "data") == setup
    )  # where the data lives: same runs
    # an older version's file (one dict of rows per seed) or another shape is ignored, not misread
    assert _reusable([{MOE: {"test": [0.9]}}, "text"], tasks, {MOE: config}, setup) == []
    assert _reusable({MOE: []}, tasks, {MOE: config}, setup) == []


def test_an_experiment_worker_ends_when_the_experiment_process_is_killed() -> None:
    """A worker whose parent is gone stops instead of training on as an orphan."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    worker = "import sys; from search.pool import _exit_with; _exit_with(int(sys.argv[1]))"
    middle = (
        "import os, subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())], "
        "stdout=subprocess.DEVNULL); print(child.pid, flush=True)"
    )  # exits at once, leaving the worker without its parent
    out = subprocess.run([sys.executable, "-c", middle], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])

    def running() -> bool:
        status = Path(f"/proc/{pid}/status")
        try:
            return "\nState:\tZ" not in status.read_text()  # a zombie has ended; init reaps it
        except FileNotFoundError:
            return False

    deadline = time.time() + 30
    while running() and time.time() < deadline:
        time.sleep(0.2)
    assert not running()


def test_best_single_is_the_most_accurate_compressed_single_net_at_equal_macs() -> None:
    """The experiment's single-net row: within 5% of the MoE's MACs when there is one, never a MoE or the
    uncompressed reference, ties to the earliest trial."""
    import pandas as pd

    from search.experiment import best_single

    table = pd.DataFrame(
        [
            # trial, val, mmacs, experts, sparsity, blocks removed
            (0, 0.990, 31.0, 1, 0.0, 0),  # the reference: not compressed
            (1, 0.985, 10.0, 1, 0.5, 0),  # more accurate, but 35% more MACs
            (2, 0.970, 7.5, 1, 0.5, 4),
            (3, 0.970, 7.3, 1, 0.5, 4),  # tie with trial 2: the earlier one wins
            (4, 0.995, 7.4, 2, 0.5, 4),  # a MoE
            (5, 0.960, 7.4, 1, 0.0, 4),  # depth alone is compression too
            (6, None, 7.4, 1, 0.5, 0),  # failed: no accuracy
        ],
        columns=["trial", "val_accuracy", "mmacs", "num_experts", "sparsity", "blocks_removed"],
    )
    assert best_single(table, 7.44) == 2
    assert best_single(table, 10.2) == 1
    assert best_single(table, 100.0) == 1  # none within 5%: the most accurate at any MACs
    assert best_single(table[table["trial"].isin([0, 4])], 7.4) is None
    assert best_single(table[table["trial"] == 5], 7.4) == 5
