"""Front table and selection policies on a study built from known points (no training)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pipelines.errors import ConfigError
from search.pareto import front_table, pick_candidates, pick_trial, trials_table
from tests.helpers import recorded

DISTRIBUTIONS = {
    "sparsity": FloatDistribution(0.0, 0.9),
    "pruner": CategoricalDistribution(["l1", "l2"]),
    "bits": CategoricalDistribution([4, 8, 32]),
    "num_experts": IntDistribution(1, 4),
    "top_k": IntDistribution(1, 2),
    "gate_size": CategoricalDistribution([4, 8]),
}

# (val accuracy, MMACs, latency ms, size KB)
POINTS = [
    (0.97, 40.0, 3.0, 300.0),  # 0: most accurate, biggest
    (0.96, 10.0, 1.0, 80.0),  # 1: knee
    (0.90, 2.0, 0.3, 20.0),  # 2: smallest
    (0.95, 12.0, 1.5, 90.0),  # 3: dominated by 1
    (0.80, 30.0, 2.0, 100.0),  # 4: dominated
]


def make_study(points=POINTS, constraint=None, reference_first: bool = False) -> optuna.Study:
    """One completed trial per point; with ``reference_first`` trial 0 is the enqueued reference."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for index, (accuracy, mmacs, latency, size) in enumerate(points):
        system_attrs = {}
        if constraint is not None:
            system_attrs["constraints:latency_ms"] = latency - constraint
        trial = optuna.trial.create_trial(
            params={
                "sparsity": 0.1 * index,
                "pruner": "l1",
                "bits": 8,
                "num_experts": 2,
                "top_k": 1,
                "gate_size": 4,
            },
            distributions=DISTRIBUTIONS,
            values=[accuracy, mmacs, latency],
            user_attrs=recorded(size_kb=size, reference="baseline" if reference_first and index == 0 else ""),
            system_attrs=system_attrs,
        )
        study.add_trial(trial)
    return study


def test_front_is_non_dominated() -> None:
    front = front_table(make_study())
    assert set(front["trial"]) == {0, 1, 2}
    rows = front[["val_accuracy", "mmacs", "latency_ms"]].to_numpy()
    for a in rows:
        for b in rows:
            dominates = b[0] >= a[0] and b[1] <= a[1] and b[2] <= a[2] and (b != a).any()
            assert not dominates


def test_policies() -> None:
    study = make_study()
    assert pick_trial(study, policy="max-accuracy").trial == 0
    assert pick_trial(study, policy="knee").trial == 1
    assert pick_trial(study, policy="min-latency").trial == 2
    assert pick_trial(study, policy="min-macs").trial == 2
    assert pick_trial(study, max_latency_ms=1.2).trial == 1
    assert pick_trial(study, max_size_kb=50).trial == 2
    assert pick_trial(study, trial=3).trial == 3
    assert "--trial" in pick_trial(study, trial=4).reason


def test_pick_errors() -> None:
    study = make_study()
    with pytest.raises(ConfigError, match="--trial: 42"):
        pick_trial(study, trial=42)
    with pytest.raises(ConfigError, match="--pick: unknown value 'kneee'"):
        pick_trial(study, policy="kneee")
    with pytest.raises(ConfigError, match="no front trial meets latency_ms <= 0.01"):
        pick_trial(study, max_latency_ms=0.01)
    empty = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    with pytest.raises(ConfigError, match="no completed trials"):
        pick_trial(empty, policy="knee")


def test_constraints_change_the_front() -> None:
    unconstrained = set(front_table(make_study())["trial"])
    constrained_study = make_study(constraint=1.2)
    constrained = set(front_table(constrained_study)["trial"])
    assert unconstrained != constrained
    assert constrained == {1, 2}  # trial 0 breaks the latency budget; 3 is still dominated by 1
    table = trials_table(constrained_study)
    assert not bool(table.set_index("trial").loc[0, "feasible"])


def test_policies_skip_the_uncompressed_reference() -> None:
    # trial 0 is the enqueued reference: it stays on the front but is not picked by a policy
    study = make_study(reference_first=True)
    assert 0 in set(front_table(study)["trial"])
    assert pick_trial(study, policy="max-accuracy").trial == 1
    assert pick_trial(study, trial=0).trial == 0


def test_candidates_are_the_most_accurate_trials_within_the_budget() -> None:
    study = make_study(reference_first=True)
    assert [pick.trial for pick in pick_candidates(study, 2)] == [1, 2]  # the reference is not a candidate
    assert [pick.trial for pick in pick_candidates(study, 5, max_mmacs=11)] == [1, 2]  # fewer exist: all
    assert [pick.trial for pick in pick_candidates(study, 1, max_mmacs=5)] == [2]
    assert "within mmacs <= 11" in pick_candidates(study, 2, max_mmacs=11)[0].reason
    with pytest.raises(ConfigError, match="--candidates: 0"):
        pick_candidates(study, 0)
    # a budget turns MACs and latency into limits: the runner-up inside it may be off the front (trial 3,
    # dominated by 1 but more accurate than 2), and the first candidate is still the front's best
    assert [pick.trial for pick in pick_candidates(study, 3, max_mmacs=12)] == [1, 3, 2]
    assert [pick.trial for pick in pick_candidates(study, 3)] == [1, 2]  # no budget: the front only
    with pytest.raises(ConfigError, match="no front trial meets mmacs <= 1"):
        pick_candidates(study, 2, max_mmacs=1)


def test_a_retimed_routing_share_replaces_the_search_time_one_in_the_constraint() -> None:
    """front --remeasure re-times a multi-expert model.onnx's routing share too: over the limit at search
    time (0.15 > 0.10), within it quietly (0.08), the model becomes feasible and joins the front."""
    from dataclasses import replace

    from search.pareto import Retimed
    from search.record import SINGLE_FILE
    from tests.helpers import made_up_record

    study = make_study(POINTS[:2])
    record = made_up_record(accuracy=0.98, mmacs=5.0)
    record = replace(
        record, measurement=replace(record.measurement, routing_share=0.15, routing_share_of=SINGLE_FILE)
    )
    study.add_trial(
        optuna.trial.create_trial(
            params={"sparsity": 0.5, "pruner": "l1", "bits": 8, "num_experts": 2, "top_k": 1, "gate_size": 4},
            distributions=DISTRIBUTIONS,
            values=[0.98, 5.0, 0.5],
            user_attrs=record.user_attrs(),
            system_attrs={"constraints:routing_share": 0.15 - 0.10},
        )
    )
    searched = trials_table(study).set_index("trial")
    assert not searched.loc[2, "feasible"] and not searched.loc[2, "on_front"]
    assert searched.loc[2, "routing_share"] == pytest.approx(0.15)
    quiet = trials_table(study, {2: Retimed(0.5, 0.08)}).set_index("trial")
    assert quiet.loc[2, "feasible"] and quiet.loc[2, "on_front"]
    assert quiet.loc[2, "routing_share"] == pytest.approx(0.08)
    assert not bool(trials_table(study, {2: Retimed(0.5, 0.12)}).set_index("trial").loc[2, "feasible"])


def test_a_retimed_latency_per_mac_replaces_the_search_time_one_in_the_constraint() -> None:
    """Over constraints.max_latency_per_mac at search time (2.0 > 1.5), within it quietly (1.2): feasible and
    on the front; the table shows the figure it was judged on."""
    from dataclasses import replace

    from search.pareto import Retimed, display_columns
    from tests.helpers import made_up_record

    study = make_study(POINTS[:2])
    record = made_up_record(accuracy=0.98, mmacs=5.0)
    measured = replace(
        record.measurement, batch_latency_ratio=0.6, macs_ratio=0.3, batch_latency={"batch": 64}
    )
    study.add_trial(
        optuna.trial.create_trial(
            params={"sparsity": 0.5, "pruner": "l1", "bits": 8, "num_experts": 1, "top_k": 1, "gate_size": 4},
            distributions=DISTRIBUTIONS,
            values=[0.98, 5.0, 0.5],
            user_attrs=replace(record, measurement=measured).user_attrs(),
            system_attrs={"constraints:latency_per_mac": 2.0 - 1.5},
        )
    )
    searched = trials_table(study).set_index("trial")
    assert not searched.loc[2, "feasible"] and searched.loc[2, "latency_per_mac"] == pytest.approx(2.0)
    quiet = trials_table(study, {2: Retimed(0.5, None, 1.2)}).set_index("trial")
    assert quiet.loc[2, "feasible"] and quiet.loc[2, "on_front"]
    assert display_columns(quiet.reset_index()).set_index("trial").loc[2, "latency_per_mac"] == "1.20x"
    assert not bool(trials_table(study, {2: Retimed(0.5, None, 1.6)}).set_index("trial").loc[2, "feasible"])
    from search.pareto import per_mac_note

    assert "at batch 64 over the MACs ratio" in per_mac_note(searched)
    assert per_mac_note(trials_table(make_study(POINTS[:2]))) == ""  # nothing timed at a batch: no note


def test_the_block_ranking_column_shows_only_where_a_trial_ranked_by_latency() -> None:
    import pandas as pd

    from search.pareto import display_columns

    table = pd.DataFrame(
        {
            "trial": [0, 1],
            "blocks_removed": [0, 3],
            "block_ranking": ["output", "output"],
            "val_accuracy": [0.9, 0.8],
        }
    )
    assert "block_ranking" not in display_columns(table).columns  # the default everywhere: nothing to read
    table.loc[1, "block_ranking"] = "latency"
    assert display_columns(table)["block_ranking"].tolist() == ["output", "latency"]
    table["blocks_removed"] = 0
    assert (
        "block_ranking" not in display_columns(table).columns
    )  # no block removed: the ranking chose nothing


def test_an_empty_front_says_which_constraint_every_trial_broke_and_by_how_much() -> None:
    """Every trial over a 0.05 ms latency limit: export has nothing to pick, and says which constraint, how
    many trials broke it, how close the closest came, and what to do."""
    study = make_study(constraint=0.05)
    with pytest.raises(ConfigError) as error:
        pick_trial(study, policy="max-accuracy")
    message = str(error.value)
    closest = min(point[2] for point in POINTS) - 0.05
    assert (
        f"latency_ms: {len(POINTS)} of {len(POINTS)} trials over, the closest {closest:.4g} over" in message
    )
    assert "new study name" in message


def test_the_reason_for_an_empty_front_counts_each_broken_constraint() -> None:
    """What `hycomp front` prints and `export` raises when every trial broke a constraint."""
    import optuna as _optuna

    from search.pareto import empty_front_reason
    from tests.helpers import recorded

    study = _optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for excess in (0.4, 0.2):
        study.add_trial(
            _optuna.trial.create_trial(
                values=[0.9, 1.0, 0.1],
                user_attrs=recorded(),
                system_attrs={"constraints:latency_per_mac": excess},
            )
        )
    reason = empty_front_reason(study)
    assert "latency_per_mac: 2 of 2 trials over, the closest 0.2 over" in reason
    assert reason.endswith("fixed when it runs.")
