"""search.study and search.stopping: samplers are seeded, a study refuses to resume under another setup,
and the stop rules end a search the way they say."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from pipelines.errors import CompressionError, ConfigError
from search.config import parse_config
from search.objective import REJECTED
from search.record import TrialRecord
from search.space import suggest
from search.stopping import MAX_REPEATS, MaxRejections, MaxRepeats, Timeout, TooManyFailures
from search.study import _write_config, make_sampler

DIRECTIONS = ["maximize", "minimize", "minimize"]


def test_same_seed_same_first_trials(tmp_path: Path) -> None:
    cfg = parse_config({"study": {"sampler": {"name": "tpe", "seed": 7}}})

    def first_params() -> list[dict]:
        study = optuna.create_study(
            directions=["maximize", "minimize", "minimize"], sampler=make_sampler(cfg)
        )
        params = []
        for index in range(4):
            trial = study.ask()
            params.append(suggest(trial, cfg.space))
            study.tell(trial, [0.5 + 0.01 * index, 10.0 - index, 1.0])
        return params

    assert first_params() == first_params()


def test_a_study_refuses_to_resume_under_another_teacher_or_trial_budget(tmp_path: Path) -> None:
    """Its finished trials were scored under the old teacher and budget: mixing would rank incomparable
    numbers. The export budget only affects exports, so changing it resumes."""
    _write_config(parse_config({}), tmp_path)
    _write_config(parse_config({"export": {"finetune_epochs": 9}, "study": {"trials": 30}}), tmp_path)
    for change, named in (
        ({"baseline": {"seed": 3}}, "baseline"),
        ({"trial": {"finetune_epochs": 9}}, "trial"),
        ({"space": {"bits": [8]}, "trial": {"lr": 0.01}}, "space, trial"),
    ):
        with pytest.raises(ConfigError) as caught:
            _write_config(parse_config(change), tmp_path)
        assert f"with a different {named}." in str(caught.value) and "study.name" in str(caught.value)


def _add(
    study: optuna.Study, state: TrialState, record: TrialRecord | None = None
) -> optuna.trial.FrozenTrial:
    trial = create_trial(
        state=state,
        values=[0.5, 1.0, 1.0] if state == TrialState.COMPLETE else None,
        user_attrs=(record or TrialRecord()).user_attrs(),
    )
    study.add_trial(trial)
    return study.trials[-1]


def test_too_many_failures_raises_after_the_window() -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    rule = TooManyFailures(window=3)
    _add(study, TrialState.COMPLETE)
    for _ in range(2):
        rule(study, _add(study, TrialState.FAIL))  # not yet: two failures
    with pytest.raises(CompressionError, match="the last 3 trials all failed"):
        rule(study, _add(study, TrialState.FAIL))


def test_rejections_in_a_row_raise_a_config_error_naming_the_budget() -> None:
    study = optuna.create_study(directions=DIRECTIONS)
    rule = MaxRejections(limit=2)
    rejected = TrialRecord(fail_reason=f"{REJECTED}: mmacs 3.0 > constraints.max_mmacs 1.0")
    rule(study, _add(study, TrialState.PRUNED, rejected))
    rule(study, _add(study, TrialState.COMPLETE))  # a trained trial breaks the run
    rule(study, _add(study, TrialState.PRUNED, rejected))
    with pytest.raises(ConfigError, match="the last 2 sampled configurations were all rejected"):
        rule(study, _add(study, TrialState.PRUNED, rejected))


def test_repeats_and_timeout_stop_the_study_quietly() -> None:
    """Inside study.optimize (where Optuna's callbacks run): repeats stop the study after MAX_REPEATS, an
    expired timeout after the trial that ran past it."""

    def objective(trial: optuna.Trial) -> list[float]:
        if trial.number > 0:  # every later trial repeats trial 0
            for key, value in TrialRecord(repeat_of=0).user_attrs().items():
                trial.set_user_attr(key, value)
        return [0.5, 1.0, 1.0]

    study = optuna.create_study(directions=DIRECTIONS)
    rule = MaxRepeats(trials=2)
    assert rule.limit == MAX_REPEATS and not rule.stopped
    study.optimize(objective, n_trials=3 * MAX_REPEATS, callbacks=[rule])
    assert rule.stopped and len(study.trials) == MAX_REPEATS + 1

    assert not Timeout(None).stopped and not Timeout(10).stopped
    expired = Timeout(0.0)
    expired.deadline -= 1
    assert expired.stopped
    study = optuna.create_study(directions=DIRECTIONS)
    study.optimize(lambda trial: [0.5, 1.0, 1.0], n_trials=5, callbacks=[expired])
    assert len(study.trials) == 1


def test_tpe_is_multivariate_with_constant_liar_unless_the_space_says_otherwise() -> None:
    cfg = parse_config({"study": {"name": "s", "trials": 2}})
    sampler = make_sampler(cfg)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._constant_liar
    override = parse_config(
        {"study": {"name": "s", "trials": 2, "sampler": {"name": "tpe", "options": {"multivariate": False}}}}
    )
    sampler = make_sampler(override)
    assert not sampler._multivariate and sampler._constant_liar
    random = make_sampler(parse_config({"study": {"name": "s", "trials": 2, "sampler": {"name": "random"}}}))
    assert isinstance(random, optuna.samplers.RandomSampler)
