"""The benchmark scripts' arithmetic (the scripts themselves run for minutes and write reports)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from search.benchmarks.samplers import accuracy_macs_hypervolume


def _study(points: list[tuple[float, float, float]], repeat_of_first: bool = False) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for index, values in enumerate(points):
        attrs = {"duplicate_of": 0} if repeat_of_first and index == len(points) - 1 else {}
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


def test_experiment_merges_rows_in_seed_order_whatever_order_they_finished() -> None:
    from search.benchmarks.experiment import CONTROL, MOE, SINGLE, _merge

    def entry(row: str, seed: int, test: float) -> dict:
        return {"row": row, "seed": seed, "test": [test], "latency_ms": [seed + 0.5], "mmacs": 10.0 + seed}

    finished = [entry(CONTROL, 2, 0.3), entry(MOE, 1, 0.2), entry(MOE, 0, 0.1), entry(CONTROL, 0, 0.5)]
    rows = _merge(finished, seeds=[0, 1, 2], single_is=7)
    assert rows[MOE]["test"] == [0.1, 0.2] and rows[MOE]["latency_ms"] == [0.5, 1.5]
    assert rows[MOE]["mmacs"] == 10.0  # per-configuration figures from the first seed
    assert rows[CONTROL]["test"] == [0.5, 0.3] and "row" not in rows[CONTROL]
    assert rows[SINGLE]["test"] == rows[MOE]["test"] and rows[SINGLE]["note"] == "= the exported trial 7"
    assert SINGLE not in _merge(finished, seeds=[0, 1, 2])
