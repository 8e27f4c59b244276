"""The trial record: one typed value per trial, stored as JSON with its version; older studies refused."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from pipelines.errors import ConfigError
from search.record import RECORD_KEY, RECORD_VERSION, TrialRecord
from tests.helpers import recorded


def _frozen(user_attrs: dict) -> optuna.trial.FrozenTrial:
    return create_trial(
        values=[0.9, 1.0, 0.1],
        params={"pruner": "l1"},
        distributions={"pruner": CategoricalDistribution(["l1", "l2"])},
        user_attrs=user_attrs,
    )


def test_a_record_survives_a_study_storage_unchanged(tmp_path) -> None:
    attrs = recorded(size_kb=12.5, reference="baseline", config={"pruner": "l1", "views": 2})
    json.dumps(attrs)  # Optuna keeps user attributes as JSON
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], storage=f"sqlite:///{tmp_path / 'study.db'}"
    )
    study.add_trial(_frozen(attrs))
    stored = TrialRecord.of(study.trials[0])
    assert stored == TrialRecord.from_dict(attrs[RECORD_KEY], "here")
    assert stored.measurement.size_kb == 12.5 and stored.training.achieved_sparsity == 0.5
    assert stored.reference == "baseline" and stored.parameters({"pruner": "l2"}) == {
        "pruner": "l1",
        "views": 2,
    }
    assert list(study.trials[0].user_attrs) == [RECORD_KEY]  # one entry, not a key per field


def test_a_trial_that_never_recorded_anything_has_an_empty_record() -> None:
    record = TrialRecord.of(_frozen({}))
    assert record == TrialRecord() and record.parameters({"pruner": "l2"}) == {"pruner": "l2"}
    assert not record.is_repeat and record.fail_reason == ""


def test_a_trial_of_an_older_hycomp_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="older hycomp.*Re-run `hycomp search` into a new study name"):
        TrialRecord.of(_frozen({"config": {"pruner": "l1"}, "val_accuracy": 0.9}))
    outdated = {**recorded()[RECORD_KEY], "version": RECORD_VERSION - 1}
    with pytest.raises(ConfigError, match="older hycomp"):
        TrialRecord.of(_frozen({RECORD_KEY: outdated}))
    with pytest.raises(ConfigError, match="unknown record fields"):
        TrialRecord.of(_frozen({RECORD_KEY: {**recorded()[RECORD_KEY], "duplicate_of": 0}}))


def test_a_running_trial_reads_what_it_was_queued_with_and_what_it_wrote() -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial({"pruner": "l1"}, user_attrs=TrialRecord(queued_by=3).user_attrs())
    trial = study.ask()
    queued = TrialRecord.of(trial)
    assert queued.queued_by == 3 and queued.config is None
    queued.update(trial, config={"pruner": "l1"}, fail_reason="why")
    assert TrialRecord.of(trial) == TrialRecord(queued_by=3, config={"pruner": "l1"}, fail_reason="why")
