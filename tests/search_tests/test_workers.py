"""Search at scale on one machine: ``hycomp search --workers N`` on one study reaches exactly
``study.trials`` completed trials, on SQLite (the default) and on Optuna's JournalStorage file."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.cli import main
from search.early_stop import EARLY_STOP
from search.record import TrialRecord

REPO = Path(__file__).resolve().parents[2]

# The cheapest real trials the schema accepts: every stage still runs (prune, KD fine-tune, MoE, QAT,
# ONNX int8 deploy, latency), each for about one optimizer step on a third of the 320 images.
CHEAP_TRIAL = {
    "subset": 0.3,
    "finetune_epochs": 0.1,
    "gate_epochs": 0.1,
    "moe_epochs": 0.1,
    "qat_epochs": 0.05,
}
SURPLUS_REASON = "not needed"


def write_cheap_space(folder: Path, data_root: Path, name: str, trials: int) -> Path:
    """The tiny test space with the cheapest trial budget, no reference trial, its own study name."""
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"].update(name=name, trials=trials, enqueue_baseline=False)
    mapping["trial"].update(CHEAP_TRIAL)
    mapping["measure"]["latency_repeats"] = 2
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def check_exact_count(study: optuna.Study, target: int, *trials_folders: Path) -> None:
    """Exactly ``target`` COMPLETE trials that evaluated a configuration (repeats reuse a result and do not
    count), each with its record and its bundle in one of
    ``trials_folders``; extra ones are PRUNED as surplus."""
    trials = study.get_trials(deepcopy=False)
    numbers = [trial.number for trial in trials]
    assert sorted(numbers) == list(range(len(trials))), f"duplicate or missing trial numbers: {numbers}"
    assert len({trial._trial_id for trial in trials}) == len(trials)
    states = {trial.number: trial.state for trial in trials}
    assert [trial for trial in trials if trial.state in (TrialState.RUNNING, TrialState.WAITING)] == [], (
        states
    )
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    records = {trial.number: TrialRecord.of(trial) for trial in trials}
    assert len([trial for trial in complete if not records[trial.number].is_repeat]) == target, states
    for trial in complete:
        record = records[trial.number]
        assert record.config and record.training and record.measurement and record.seconds, trial.number
        assert record.fail_reason == ""
        assert trial.values == pytest.approx(list(record.measurement.objectives))
        # a trial that reused an identical earlier trial's result has its model in that trial's folder
        owner = trial.number if record.repeat_of is None else record.repeat_of
        bundles = [folder / f"trial_{owner}" / "bundle" / "manifest.json" for folder in trials_folders]
        assert any(bundle.exists() for bundle in bundles), f"trial {trial.number} left no bundle"
    pruned = [trial for trial in trials if trial.state == TrialState.PRUNED]
    for trial in pruned:
        # the space has no constraints: a trial is pruned by a worker that lost the race (before any work) or
        # by the early-stop rule after a stage (its partial numbers kept, nothing measured)
        reason = records[trial.number].fail_reason
        if reason.startswith(EARLY_STOP):
            assert records[trial.number].measurement is None and records[trial.number].partial_val_accuracy
            continue
        assert SURPLUS_REASON in reason, trial.user_attrs
        assert records[trial.number].config is None, "a surplus trial must stop before doing any work"
    for trial in trials:
        if trial.state == TrialState.FAIL:
            assert records[trial.number].fail_reason, f"trial {trial.number} failed without a reason"


def test_a_trial_beyond_the_target_is_pruned_as_surplus(tmp_path: Path) -> None:
    """The race the workers can lose, played in order: with the target 2, trial 0 complete and trial 1
    running (worker A), a trial that worker B started anyway (2) stops at once as PRUNED "not needed"."""
    from search.config import parse_config
    from search.evaluation import TrialContext
    from search.objective import DIRECTIONS, Objective

    study = optuna.create_study(directions=list(DIRECTIONS))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0, 0.1], state=TrialState.COMPLETE))
    running = study.ask()
    context = TrialContext(parse_config({}), data=None, teacher=None, study_folder=tmp_path)
    study.optimize(Objective(context, target_trials=2), n_trials=1)
    surplus = study.trials[-1]
    assert (running.number, surplus.number) == (1, 2)
    assert surplus.state == TrialState.PRUNED
    assert SURPLUS_REASON in TrialRecord.of(surplus).fail_reason and surplus.params == {}
    assert study.trials[1].state == TrialState.RUNNING  # the trial that won the race is untouched
    assert not (tmp_path / "trials").exists()


@pytest.mark.slow
def test_four_workers_on_sqlite_complete_exactly_the_target(
    tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "results"
    monkeypatch.setenv("HYCOMP_RESULTS", str(results))  # spawned workers inherit it
    space = write_cheap_space(tmp_path, synthetic_root, "workers-sqlite", trials=12)
    assert main(["search", "--space", str(space), "--workers", "4", "--no-progress"]) == 0
    assert "12 completed trials" in capsys.readouterr().out
    folder = results / "workers-sqlite"
    study = optuna.load_study(study_name="workers-sqlite", storage=f"sqlite:///{folder / 'study.db'}")
    check_exact_count(study, 12, folder / "trials")
    # running it again finds the target reached and starts nothing
    before = len(study.trials)
    assert main(["search", "--space", str(space), "--workers", "4", "--no-progress"]) == 0
    assert len(study.trials) == before


@pytest.mark.slow
def test_workers_on_a_journal_file(
    tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Spawned workers share the study through a journal file; like the parent, they keep Optuna's
    experimental-feature and reference-trial warnings off the user's terminal."""
    results = tmp_path / "results"
    monkeypatch.setenv("HYCOMP_RESULTS", str(results))
    space = write_cheap_space(tmp_path, synthetic_root, "workers-journal", trials=6)
    journal = tmp_path / "storage" / "study.log"
    code = main(
        ["search", "--space", str(space), "--storage", str(journal), "--workers", "3", "--no-progress"]
    )
    assert code == 0
    err = capfd.readouterr().err
    assert "ExperimentalWarning" not in err and "is out of range" not in err
    assert journal.stat().st_size > 0
    folder = results / "workers-journal"
    assert not (folder / "study.db").exists(), "--storage *.log must not fall back to SQLite"
    study = optuna.load_study(
        study_name="workers-journal",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    check_exact_count(study, 6, folder / "trials")


def test_workers_of_one_study_do_not_propose_the_same_configurations() -> None:
    # Each worker process builds its own sampler. With one seed, the workers' first (random start-up)
    # proposals were identical, so two processes trained the same configuration side by side.
    from search.config import load_config
    from search.space import suggest
    from search.study import make_sampler
    from search.workers import worker_config

    cfg = load_config(REPO / "search_spaces" / "bloodmnist.yaml")
    assert worker_config(cfg, 0) is cfg  # one worker: the study's own seed, unchanged
    proposals = []
    for index in range(2):
        study = optuna.create_study(
            directions=["maximize", "minimize", "minimize"], sampler=make_sampler(worker_config(cfg, index))
        )
        proposals.append([suggest(study.ask(), cfg.space) for _ in range(4)])
    assert worker_config(cfg, 1).study.sampler.seed == cfg.study.sampler.seed + 1
    assert all(first != second for first, second in zip(*proposals, strict=True))
