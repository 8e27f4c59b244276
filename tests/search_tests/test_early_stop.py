"""The early-stop rule on studies built from known points (no training), its replay, its settings, and one
search in which it stops a trial but never the reference."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipelines.errors import ConfigError
from search.config import EarlyStopSettings, parse_config
from search.early_stop import EARLY_STOP, StoppedEarly, judge, replay, stage_check
from search.pareto import failures_table, front_table
from search.record import TrialRecord
from search.stopping import MaxEarlyStops
from tests.helpers import made_up_record

REPO = Path(__file__).resolve().parents[2]
ON = EarlyStopSettings(min_trials=4, quantile=1.0, slack=0.005)


def _record(
    accuracy: float, mmacs: float, stages: dict[str, float], reference: str = "", repeat_of: int | None = None
) -> TrialRecord:
    seconds = {"prune": 1.0, "finetune": 4.0, "moe": 3.0, "quantize": 1.0, "deploy": 1.0, "measure": 2.0}
    return made_up_record(
        accuracy=accuracy,
        mmacs=mmacs,
        stages=stages,
        reference=reference,
        repeat_of=repeat_of,
        config={"sparsity": 0.5},
        seconds={**seconds, "total": sum(seconds.values())},
    )


def _stages(final: float, finetune_gain: float) -> dict[str, float]:
    """Stage accuracies that end ``finetune_gain`` below ``final`` after finetuning."""
    finetuned = final - finetune_gain
    return {"pruned": 0.1, "finetuned": finetuned, "moe": finetuned, "quantized": final}


def make_study(points: list[tuple[float, float, float]], reference_first: bool = True) -> optuna.Study:
    """One completed trial per (final val accuracy, MMACs, gain after finetuning); same latency for all.
    Trial 0 is the reference unless ``reference_first`` is false."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for index, (accuracy, mmacs, gain) in enumerate(points):
        reference = "baseline" if reference_first and index == 0 else ""
        record = _record(accuracy, mmacs, _stages(accuracy, gain), reference)
        study.add_trial(
            optuna.trial.create_trial(values=[accuracy, mmacs, 0.1], user_attrs=record.user_attrs())
        )
    return study


# reference (most accurate, most MACs), a small accurate trial (on the front), and three more trained trials:
# the later stages added at most 0.02 after finetuning in all four trained trials
POINTS = [(0.95, 10.0, 0.0), (0.93, 1.0, 0.01), (0.90, 2.0, 0.02), (0.85, 3.0, 0.015), (0.80, 4.0, 0.005)]


def test_a_clearly_hopeless_trial_is_stopped_with_its_reason() -> None:
    study = make_study(POINTS)
    verdict = judge(ON, study.trials, study.best_trials, "finetune", 0.70, 5.0)
    assert verdict is not None and verdict.by_trial == 1 and verdict.gain == pytest.approx(0.02)
    assert verdict.learned_from == 4  # the reference teaches no gain
    assert verdict.reachable == pytest.approx(0.725)
    reason = verdict.reason
    assert reason.startswith(f"{EARLY_STOP} finetune: val 0.7000 + learned gain 0.0200")
    assert "< 0.9300 of trial 1 at 1 <= 5 MMACs" in reason


def test_a_trial_that_can_reach_the_front_or_has_fewer_macs_goes_on() -> None:
    study = make_study(POINTS)
    # 0.91 + 0.02 + 0.005 reaches trial 1's 0.93: not hopeless
    assert judge(ON, study.trials, study.best_trials, "finetune", 0.91, 5.0) is None
    # more accurate trials exist, but none with at most its 0.5 MMACs
    assert judge(ON, study.trials, study.best_trials, "finetune", 0.50, 0.5) is None
    # nothing on the front beats what it can reach: its MACs are never computed
    calls = []
    assert (
        judge(ON, study.trials, study.best_trials, "quantize", 0.95, lambda: calls.append(1) or 1.0) is None
    )
    assert calls == []


def test_too_few_earlier_trials_or_disabled_does_nothing() -> None:
    study = make_study(POINTS[:4])  # three trained trials
    assert judge(ON, study.trials, study.best_trials, "finetune", 0.1, 5.0) is None
    assert judge(EarlyStopSettings(min_trials=3), study.trials, study.best_trials, "finetune", 0.1, 5.0)
    full = make_study(POINTS)
    assert (
        judge(EarlyStopSettings(enabled=False), full.trials, full.best_trials, "finetune", 0.1, 5.0) is None
    )


def test_the_callback_stops_with_partial_numbers_but_never_the_reference() -> None:
    study = make_study(POINTS)
    running = TrialRecord(config={"sparsity": 0.9})
    check = stage_check(ON, study, running, lambda: 5.0)
    with pytest.raises(StoppedEarly) as stopped:
        check("prune", 1.5, 0.05)  # 0.05 + the largest gain after pruning (0.83) < 0.93
    assert stopped.value.val_accuracy == {"pruned": 0.05} and stopped.value.seconds == {"prune": 1.5}
    check = stage_check(ON, study, running, lambda: 5.0)
    check("prune", 1.5, 0.2)  # 0.2 + 0.83 reaches the front: goes on
    with pytest.raises(StoppedEarly) as stopped:
        check("finetune", 4.0, 0.5)
    assert stopped.value.val_accuracy == {"pruned": 0.2, "finetuned": 0.5}
    assert stopped.value.seconds == {"prune": 1.5, "finetune": 4.0}
    assert stopped.value.verdict.stage == "finetune"
    assert stage_check(ON, study, TrialRecord(reference="baseline"), lambda: 5.0) is None
    assert stage_check(ON, study, TrialRecord(repeat_of=1), lambda: 5.0) is None
    assert stage_check(EarlyStopSettings(enabled=False), study, running, lambda: 5.0) is None


def test_a_pruned_trial_leaves_the_front_and_the_failures_readable() -> None:
    study = make_study(POINTS)
    record = TrialRecord(
        config={"sparsity": 0.9},
        partial_val_accuracy={"pruned": 0.05},
        seconds={"prune": 1.5, "total": 1.6},
        fail_reason=f"{EARLY_STOP} prune: ...",
    )
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs=record.user_attrs()))
    assert set(front_table(study)["trial"]) == {0, 1}
    failures = failures_table(study)
    assert failures["state"].tolist() == ["PRUNED"] and failures["reason"][0].startswith(EARLY_STOP)
    assert TrialRecord.of(study.trials[-1]).partial_val_accuracy == {"pruned": 0.05}


def test_replay_stops_no_front_trial_when_the_margin_holds_and_catches_one_when_it_does_not() -> None:
    # trial 5 is hopeless after finetuning and ends off the front (the later stages add 0.01 as learned)
    safe = make_study([*POINTS, (0.71, 5.0, 0.01)])
    result = replay(safe, ON)
    assert result.judged == 5 and [number for number, _ in result.stopped] == [5]
    assert result.stopped[0][1].stage == "finetune" and result.stopped_on_front == []
    assert result.saved_seconds == pytest.approx(3.0 + 1.0 + 1.0 + 2.0)  # moe, quantize, deploy, measure
    # the same trial, but its later stages add 0.26 where earlier trials added at most 0.02: the learned
    # margin is wrong, and the replay says so (the stopped trial is the most accurate at 5 MMACs... and on
    # the final front)
    wrong = make_study([*POINTS, (0.96, 5.0, 0.26)])
    result = replay(wrong, ON)
    assert [number for number, _ in result.stopped] == [5] and result.stopped_on_front == [5]


def test_many_early_stops_end_the_search() -> None:
    """Early-stopped trials do not count toward ``study.trials``; a sampler that keeps proposing hopeless
    configurations still ends the loop."""
    study = make_study(POINTS)
    rule = MaxEarlyStops(trials=2)

    def hopeless(trial: optuna.Trial) -> float:
        TrialRecord(fail_reason=f"{EARLY_STOP} prune: ...").write(trial)
        raise optuna.TrialPruned()

    study.optimize(hopeless, n_trials=10 * rule.limit, callbacks=[rule])
    assert rule.stopped and len(study.get_trials(states=(TrialState.PRUNED,))) == rule.limit


def _space(**early_stop) -> dict:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["study"]["early_stop"] = early_stop
    return mapping


def test_settings_are_checked() -> None:
    assert parse_config(_space()).study.early_stop == EarlyStopSettings()
    mapping = _space()
    mapping["study"]["early_stop"] = False
    assert parse_config(mapping).study.early_stop.enabled is False
    for bad, field in (
        ({"quantile": 0.0}, "quantile"),
        ({"min_trials": 0}, "min_trials"),
        ({"slack": -0.1}, "slack"),
    ):
        with pytest.raises(ConfigError, match=f"study.early_stop.{field}"):
            parse_config(_space(**bad))
    with pytest.raises(ConfigError, match="study.early_stop.patience: unknown key"):
        parse_config(_space(patience=2))
