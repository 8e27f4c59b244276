"""The objective: a model is trained once (the model cache), a configuration measured before reuses that result,
only compression errors fail a trial, and an interrupted trial says so and its reference is queued again."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.cli import main
from search.record import INTERRUPTED, PER_EXPERT_FILES, SINGLE_FILE, TrialRecord

REPO = Path(__file__).resolve().parents[2]


def _one_point_space(folder: Path, data_root: Path, name: str, **space) -> Path:
    """tiny.yaml narrowed to one trained configuration (one sparsity, pruner, bit-width, a single expert),
    2 trials; ``space`` adds or overrides keys of ``space:``."""
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"].update(name=name, trials=2, enqueue_baseline=False)
    mapping["space"].update(
        sparsity={"low": 0.5, "high": 0.5},
        pruner=["l1"],
        bits=[8],
        num_experts={"low": 1, "high": 1},
        top_k={"low": 1, "high": 1},
        gate_size=[4],
        **space,
    )
    mapping["measure"]["latency_repeats"] = 2
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.mark.slow
def test_a_views_trial_measures_the_trained_model_again(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """Two configurations that differ in views only: one training; the trained model is queued with the other
    views value, and that trial re-measures it (twice or half the MACs of the same network), and the export
    of the 2-view trial runs the views."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "views", views=[1, 2])
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    folder = tmp_path / "results" / "views"
    study = optuna.load_study(study_name="views", storage=f"sqlite:///{folder / 'study.db'}")
    trials = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not TrialRecord.of(t).is_repeat]
    records = {TrialRecord.of(t).config["views"]: TrialRecord.of(t) for t in trials}
    by_views = {TrialRecord.of(t).config["views"]: t for t in trials}
    assert sorted(by_views) == [1, 2]
    first, second = (TrialRecord.of(t) for t in sorted(trials, key=lambda t: t.number))
    assert first.trained and not second.trained and first.model == second.model
    assert second.queued_by == min(t.number for t in trials)  # queued by the first trial, not sampled
    assert "finetune" in first.seconds and "finetune" not in second.seconds  # measured, not trained
    assert [path.name for path in (folder / "models").iterdir()] == [first.model]  # one training
    assert records[2].measurement.mmacs == pytest.approx(2 * records[1].measurement.mmacs, rel=1e-6)
    assert records[2].measurement.size_kb == pytest.approx(records[1].measurement.size_kb)
    assert records[2].training == records[1].training
    number = by_views[2].number
    assert main(["export", str(folder), "--trial", str(number)]) == 0
    bundle = folder / "export" / f"trial_{number}" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["views"] == 2
    # both are candidates within a budget (the 2-view one is off the front: twice the MACs, no gain needed);
    # the full-budget retraining trains their shared model once and measures it with each views value
    out = folder / "export" / "best"
    command = [
        "export",
        str(folder),
        "--retrain",
        "--candidates",
        "2",
        "--max-mmacs",
        "1000",
        "--out",
        str(out),
    ]
    assert main(command) == 0
    candidates = folder / "export" / "candidates"
    saved = {
        views: json.loads((candidates / f"trial_{trial.number}" / "candidate.json").read_text())["record"]
        for views, trial in by_views.items()
    }
    full = {views: TrialRecord.from_dict(record, "candidate") for views, record in saved.items()}
    assert full[1].trained != full[2].trained and full[1].model == full[2].model  # one training
    trained, measured = (full[1], full[2]) if full[1].trained else (full[2], full[1])
    assert "finetune" in trained.seconds and "finetune" not in measured.seconds
    assert full[2].measurement.mmacs == pytest.approx(2 * full[1].measurement.mmacs, rel=1e-6)
    assert full[2].training == full[1].training


@pytest.mark.slow
def test_a_repeated_configuration_is_not_trained_again(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys, caplog
) -> None:
    """A one-point space: later trials reuse the first's result and do not count toward the target; the
    search stops once the sampler has proposed the evaluated point MAX_REPEATS times; the front lists the
    point once; exporting a repeat uses the first trial's saved model."""
    from search.stopping import MAX_REPEATS

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "one-point")
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    assert "few new points left" in caplog.text
    assert f"1 completed trials (+{MAX_REPEATS} repeated" in capsys.readouterr().out

    folder = tmp_path / "results" / "one-point"
    study = optuna.load_study(study_name="one-point", storage=f"sqlite:///{folder / 'study.db'}")
    first, *repeats = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(repeats) == MAX_REPEATS and not TrialRecord.of(first).is_repeat
    second = repeats[0]
    assert all(TrialRecord.of(trial).repeat_of == first.number for trial in repeats)
    assert all(TrialRecord.of(trial).measurement == TrialRecord.of(first).measurement for trial in repeats)
    assert all(trial.values == first.values for trial in repeats)
    assert sorted(path.name for path in (folder / "trials").iterdir()) == [f"trial_{first.number}"]

    from search.pareto import front_table

    assert front_table(study)["trial"].tolist() == [first.number]
    assert main(["export", str(folder), "--trial", str(second.number)]) == 0
    assert (folder / "export" / f"trial_{second.number}" / "report.md").exists()


def _tiny_space(folder: Path, data_root: Path, name: str, trials: int) -> Path:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"].update(name=name, trials=trials)
    mapping["measure"]["latency_repeats"] = 2
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.mark.slow
def test_a_compute_budget_rejects_configurations_before_training(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """--max-mmacs: configurations whose estimated MACs break it are PRUNED before any training (the
    uncompressed reference among them); every completed trial is within the budget."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "budget", trials=2)
    command = ["search", "--space", str(space), "--max-mmacs", "1.6", "--max-routing-share", "0.5"]
    assert main([*command, "--no-progress"]) == 0
    folder = tmp_path / "results" / "budget"
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{folder / 'study.db'}")
    rejected = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert rejected and TrialRecord.of(rejected[0]).reference, "the 2.5-MMACs reference breaks a 1.6 budget"
    for trial in rejected:
        assert TrialRecord.of(trial).fail_reason.startswith("rejected before training: mmacs")
        assert "constraints.max_mmacs 1.6" in TrialRecord.of(trial).fail_reason
        assert not (folder / "trials" / f"trial_{trial.number}").exists(), "nothing was trained"
    assert len([t for t in complete if not TrialRecord.of(t).is_repeat]) == 2
    for t in complete:
        measured = TrialRecord.of(t).measurement
        # a multi-expert model is timed as its model.onnx, and its routing share is a constraint too
        multi = TrialRecord.of(t).parameters(t.params).get("num_experts", 1) > 1
        assert (measured.routing_share_of == SINGLE_FILE) == multi
        expected = {"mmacs": pytest.approx(t.values[1] - 1.6)}
        if multi:
            expected["routing_share"] = pytest.approx(measured.routing_share - 0.5)
        assert t.values[1] <= 1.6 and t.constraints == expected


@pytest.mark.slow
def test_a_latency_ranked_depth_search_times_its_blocks_once_and_records_batch_figures(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """A space ranking removed blocks by latency: the study measures the teacher's block shares once, in its
    folder, before any trial; each trial removes its block by them and is also timed at the throughput
    batch, its latency per MAC a constraint."""
    from search.latency import BLOCK_TIME_FILE

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "ranked", trials=1)
    mapping = yaml.safe_load(space.read_text())
    mapping["space"].update(
        blocks_removed={"low": 1, "high": 1}, block_ranking=["latency"], num_experts={"low": 1, "high": 1}
    )
    mapping["study"]["enqueue_baseline"] = False
    mapping["measure"]["throughput_batch"] = 8
    mapping["constraints"]["max_latency_per_mac"] = 50.0
    space.write_text(yaml.safe_dump(mapping))
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    folder = tmp_path / "results" / "ranked"
    block_time = json.loads((folder / BLOCK_TIME_FILE).read_text())
    assert block_time["batch"] == 8 and list(block_time["shares"]) == ["layers.0.0"]  # ResNet-8's one block
    study = optuna.load_study(study_name="ranked", storage=f"sqlite:///{folder / 'study.db'}")
    (trial,) = study.get_trials(states=(TrialState.COMPLETE,))
    assert trial.params["block_ranking"] == "latency" and trial.params["blocks_removed"] == 1
    measured = TrialRecord.of(trial).measurement
    assert measured.batch_latency["batch"] == 8 and measured.teacher_batch_latency["batch"] == 8
    assert trial.constraints["latency_per_mac"] == pytest.approx(measured.latency_per_mac - 50.0)


def test_a_multi_expert_model_over_the_routing_share_is_infeasible() -> None:
    """constraints.max_routing_share binds the model.onnx share of multi-expert trials only; null lifts it."""
    from dataclasses import replace
    from types import SimpleNamespace

    from search.config import SearchConfig
    from search.objective import Objective
    from tests.helpers import made_up_record

    def constraints(share_of: str, share: float, limit: float | None) -> dict:
        cfg = SearchConfig().replace(constraints={"max_routing_share": limit})
        objective = Objective.__new__(Objective)
        objective.ctx = SimpleNamespace(cfg=cfg)
        record = made_up_record()
        record = replace(
            record, measurement=replace(record.measurement, routing_share=share, routing_share_of=share_of)
        )
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
        trial = study.ask()
        objective._set_constraints(trial, record)
        study.tell(trial, [0.9, 1.0, 0.1])
        return study.trials[0].constraints

    assert constraints(SINGLE_FILE, 0.25, 0.1) == {"routing_share": pytest.approx(0.15)}  # infeasible
    assert constraints(SINGLE_FILE, 0.05, 0.1) == {"routing_share": pytest.approx(-0.05)}
    assert constraints(PER_EXPERT_FILES, 0.25, 0.1) == {}  # a single net's numpy-glue share binds nothing
    assert constraints(SINGLE_FILE, 0.25, None) == {}


def test_a_model_whose_latency_falls_slower_than_its_macs_is_infeasible() -> None:
    """constraints.max_latency_per_mac binds the latency ratio at the throughput batch over the MACs ratio,
    wherever it was timed; null lifts it."""
    from dataclasses import replace
    from types import SimpleNamespace

    from search.config import SearchConfig
    from search.objective import Objective
    from tests.helpers import made_up_record

    def constraints(batch_ratio: float | None, macs_ratio: float, limit: float | None) -> dict:
        cfg = SearchConfig().replace(constraints={"max_latency_per_mac": limit})
        objective = Objective.__new__(Objective)
        objective.ctx = SimpleNamespace(cfg=cfg)
        record = made_up_record()
        measured = replace(record.measurement, batch_latency_ratio=batch_ratio, macs_ratio=macs_ratio)
        study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
        trial = study.ask()
        objective._set_constraints(trial, replace(record, measurement=measured))
        study.tell(trial, [0.9, 1.0, 0.1])
        return study.trials[0].constraints

    # x0.6 the teacher at 0.3 of its MACs: 2.0x, over 1.5
    assert constraints(0.6, 0.3, 1.5) == {"latency_per_mac": pytest.approx(0.5)}
    assert constraints(0.4, 0.3, 1.5) == {"latency_per_mac": pytest.approx(0.4 / 0.3 - 1.5)}  # within
    assert constraints(None, 0.3, 1.5) == {}  # not timed at the batch (predicted latency): nothing to bind
    assert constraints(0.6, 0.3, None) == {}


@pytest.mark.slow
def test_an_unreachable_budget_stops_with_a_clear_message(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys
) -> None:
    from search.stopping import MAX_REJECTIONS

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "impossible", trials=2)
    assert main(["search", "--space", str(space), "--max-mmacs", "0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the last {MAX_REJECTIONS} sampled configurations were all rejected" in err
    assert "--max-mmacs" in err and "Traceback" not in err
    folder = tmp_path / "results" / "impossible"
    study = optuna.load_study(study_name="impossible", storage=f"sqlite:///{folder / 'study.db'}")
    assert not study.get_trials(states=(TrialState.COMPLETE,))
    assert not (folder / "trials").exists() or not any((folder / "trials").iterdir())


def _interrupting(monkeypatch, error: BaseException) -> None:
    """The next training raises ``error`` from inside the compression stage."""
    import search.evaluation as evaluation

    def stage(*args, **kwargs):
        raise error

    monkeypatch.setattr(evaluation, "compress_hybrid", stage)


@pytest.mark.slow
def test_an_interrupted_reference_says_so_and_is_queued_again(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys
) -> None:
    """Ctrl-C during trial 0 of a new study (the uncompressed reference): the trial fails with the reason
    "interrupted"; the resumed study queues the reference again and completes it; the front lists a reason
    for every failed trial."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "ctrl-c")
    mapping = yaml.safe_load(space.read_text())
    mapping["study"].update(enqueue_baseline=True, trials=1)
    space.write_text(yaml.safe_dump(mapping))
    folder = tmp_path / "results" / "ctrl-c"
    with monkeypatch.context() as patch:
        _interrupting(patch, KeyboardInterrupt())
        assert main(["search", "--space", str(space), "--no-progress"]) == 2
    study = optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{folder / 'study.db'}")
    (interrupted,) = study.trials
    record = TrialRecord.of(interrupted)
    assert interrupted.state == TrialState.FAIL and record.reference and record.fail_reason == INTERRUPTED

    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    study = optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{folder / 'study.db'}")
    references = [t for t in study.trials if TrialRecord.of(t).reference]
    assert [t.state for t in references] == [TrialState.FAIL, TrialState.COMPLETE]
    assert TrialRecord.of(references[1]).config["sparsity"] == 0.0  # the uncompressed point itself
    capsys.readouterr()
    assert main(["front", str(folder)]) == 0
    out = capsys.readouterr().out
    assert INTERRUPTED in out


@pytest.mark.slow
def test_a_bug_in_a_stage_stops_the_search_instead_of_failing_the_trial(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """Only a compression stage's own errors (CompressionError) fail a trial; a ValueError from a stage is a
    bug: it surfaces, and the trial records it."""
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _one_point_space(tmp_path, synthetic_root, "bug")
    _interrupting(monkeypatch, ValueError("a programming error"))
    with pytest.raises(ValueError, match="a programming error"):
        main(["search", "--space", str(space), "--no-progress"])
    folder = tmp_path / "results" / "bug"
    study = optuna.load_study(study_name="bug", storage=f"sqlite:///{folder / 'study.db'}")
    (failed,) = study.trials
    assert failed.state == TrialState.FAIL
    assert TrialRecord.of(failed).fail_reason == "unexpected ValueError: a programming error"


@pytest.mark.slow
def test_early_stop_stops_a_hopeless_trial_but_never_the_reference(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys
) -> None:
    """Two trials teach the rule what the later stages add; then the reference and one sampled trial report
    an impossible accuracy (-1) at every stage, at a made-up cost that every front trial undercuts. The
    reference completes; the sampled trial is PRUNED after its first stage with the rule's reason and its
    partial numbers; the search still completes its target, and front and report list the stopped trial."""
    import search.evaluation as evaluation
    import search.objective as objective
    from search.early_stop import EARLY_STOP

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = _tiny_space(tmp_path, synthetic_root, "early", trials=2)
    mapping = yaml.safe_load(space.read_text())
    mapping["study"].update(enqueue_baseline=False, early_stop={"min_trials": 1, "slack": 0.0})
    space.write_text(yaml.safe_dump(mapping))
    assert main(["search", "--space", str(space), "--no-progress"]) == 0  # two trained trials teach the gain

    real = evaluation.compress_hybrid
    sampled = {"count": 0}

    def impossible(teacher, data, cfg, budget, seed=0, sources=None, on_stage=None):
        reference = cfg.prune.sparsity == 0
        if not reference:
            sampled["count"] += 1
        report = on_stage
        if reference or sampled["count"] == 1:
            report = lambda stage, seconds, accuracy: on_stage(stage, seconds, -1.0)  # noqa: E731
        return real(teacher, data, cfg, budget, seed=seed, sources=sources, on_stage=report)

    monkeypatch.setattr(evaluation, "compress_hybrid", impossible)
    # the impossible trials cost more than anything on the front; the others less than anything (never stopped)
    monkeypatch.setattr(
        objective,
        "estimate_cost",
        lambda ctx, params: {
            "mmacs": 1e6 if params["sparsity"] == 0 or sampled["count"] == 1 else 0.0,
            "size_kb": 1.0,
        },
    )
    mapping["study"].update(enqueue_baseline=True, trials=4)
    space.write_text(yaml.safe_dump(mapping))
    assert main(["search", "--space", str(space), "--no-progress"]) == 0

    folder = tmp_path / "results" / "early"
    study = optuna.load_study(study_name="early", storage=f"sqlite:///{folder / 'study.db'}")
    (reference,) = [t for t in study.trials if TrialRecord.of(t).reference]
    assert reference.state == TrialState.COMPLETE, "the reference is never stopped"
    (stopped,) = study.get_trials(states=(TrialState.PRUNED,))
    record = TrialRecord.of(stopped)
    assert record.fail_reason.startswith(f"{EARLY_STOP} prune: val -1.0000 + learned gain")
    assert "<= 1e+06 MMACs" in record.fail_reason
    assert record.partial_val_accuracy == {"pruned": -1.0} and "prune" in record.seconds
    assert record.measurement is None and not (folder / "models" / record.model).exists()
    evaluated = [
        t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not TrialRecord.of(t).is_repeat
    ]
    assert len(evaluated) == 4  # the stopped trial does not count
    capsys.readouterr()
    assert main(["front", str(folder)]) == 0
    assert EARLY_STOP in capsys.readouterr().out
    assert main(["report", str(folder)]) == 0
    assert EARLY_STOP in (folder / "report.md").read_text()


@pytest.mark.slow
def test_a_trial_with_blocks_removed_runs_end_to_end(
    tmp_path: Path, synthetic_root: Path, monkeypatch
) -> None:
    """blocks_removed: the trial's model is shallower (its checkpoint rebuilds without the block), its MACs are
    what estimate_cost predicted and fewer than the same pruning keeps without depth reduction."""
    import torch

    from pipelines.compress.depth import RemovedBlock
    from pipelines.moe import rebuild_moe
    from pipelines.serialize import load_checkpoint
    from search.config import load_config
    from search.evaluation import TrialContext, estimate_cost

    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    # resnet8's first block (8 -> 8 channels, stride 1) is its one block with an identity shortcut
    space = _one_point_space(tmp_path, synthetic_root, "depth", blocks_removed={"low": 1, "high": 1})
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    folder = tmp_path / "results" / "depth"
    study = optuna.load_study(study_name="depth", storage=f"sqlite:///{folder / 'study.db'}")
    trial = next(
        t for t in study.get_trials(states=(TrialState.COMPLETE,)) if not TrialRecord.of(t).is_repeat
    )
    record = TrialRecord.of(trial)
    assert record.config["blocks_removed"] == 1
    moe = rebuild_moe(*load_checkpoint(folder / "trials" / f"trial_{trial.number}" / "model"))
    assert isinstance(moe.experts[0].layers[0][0], RemovedBlock)

    from pipelines.data import load_dataset

    cfg = load_config(space)
    data = load_dataset("bloodmnist", synthetic_root, verify_md5=False)
    teacher = cfg.model.spec.build(data.channels, data.num_classes, data.image_size).eval()
    context = TrialContext(cfg, data, teacher, tmp_path)
    shallow = estimate_cost(context, record.config)["mmacs"]
    assert shallow == pytest.approx(record.measurement.mmacs, rel=1e-6)
    assert shallow < estimate_cost(context, {**record.config, "blocks_removed": 0})["mmacs"]
    assert torch.isfinite(torch.tensor(trial.values)).all()
