"""The whole product on synthetic MedMNIST-format data: search -> front -> export -> predict, and the
CLI's handling of bad input (exit code 2, one clear message, nothing written)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from pipelines.errors import ConfigError
from search.cli import main
from search.latency import stored_reference
from search.record import TrialRecord

REPO = Path(__file__).resolve().parents[2]


def write_space(folder: Path, data_root: Path, **sections) -> Path:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> dict:
    """One real search of 3 trials (the baseline reference + 2 sampled), shared by the tests below."""
    work = tmp_path_factory.mktemp("study")
    results = work / "results"
    mp = pytest.MonkeyPatch()
    mp.setenv("HYCOMP_RESULTS", str(results))
    space = write_space(work, synthetic_root)
    code = main(["search", "--space", str(space), "--no-progress"])
    yield {"code": code, "results": results, "space": space, "folder": results / "tiny", "mp": mp}
    mp.undo()


@pytest.mark.slow
def test_search_runs_and_records_everything(searched: dict) -> None:
    assert searched["code"] == 0
    folder = searched["folder"]
    assert (folder / "config.yaml").exists() and (folder / "study.db").exists()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    records = {t.number: TrialRecord.of(t) for t in complete}
    assert len([t for t in complete if not records[t.number].is_repeat]) == 3
    yardstick = stored_reference(study)  # chosen at the start, before any trial
    assert yardstick.engine in yardstick.timings and yardstick.teacher_median_ms > 0
    assert (folder / "reference" / "bundle" / "manifest.json").exists()
    assert study.metric_names == ["val_accuracy", "mmacs", "latency_ms"]
    reference = records[0]
    assert reference.config["sparsity"] == 0.0 and reference.config["bits"] == 32 and reference.reference
    for trial in complete:
        measured = records[trial.number].measurement
        assert 0.0 <= trial.values[0] <= 1.0 and trial.values[1] > 0 and trial.values[2] > 0
        assert trial.values == list(measured.objectives)
        assert measured.params > 0 and measured.size_kb > 0 and 0.0 <= measured.routing_share <= 1.0
        assert records[trial.number].seconds["total"] > 0
        assert measured.latency["batch"] == 1 and measured.latency["threads"] == 1
        # timed against the teacher's int8 bundle on the study's engine, scored by the ratio
        assert measured.engine == yardstick.engine and yardstick.engine in measured.latency["backend"]
        assert measured.latency_ms == pytest.approx(measured.latency_ratio * yardstick.teacher_median_ms)
        assert measured.teacher_latency["median_ms"] > 0 and measured.teacher_latency["batch"] == 1
    sampled = [t for t in complete if t.number > 0]
    assert all(records[t.number].training.achieved_sparsity > 0.1 for t in sampled)
    # compressed trials really compute less than the uncompressed reference
    assert min(t.values[1] for t in sampled) < study.trials[0].values[1]


@pytest.mark.slow
def test_rerun_resumes_without_new_work(searched: dict) -> None:
    study_db = searched["folder"] / "study.db"
    artifacts = [searched["folder"] / "trials", searched["folder"] / "models"]

    def written() -> dict:  # every file a trial writes (models, bundles), with when it was last written
        return {path: path.stat().st_mtime_ns for root in artifacts for path in root.rglob("*")}

    before = written()
    first = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_db}")
    before_trials, engine = len(first.trials), stored_reference(first)
    assert main(["search", "--space", str(searched["space"]), "--no-progress"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_db}")
    assert len(study.trials) == before_trials
    assert stored_reference(study) == engine  # the engine and the teacher's quiet latency are not re-chosen
    assert before and written() == before, "a resumed search that has nothing to do rewrote trial files"


@pytest.mark.slow
def test_front_writes_table_csv_and_plots(searched: dict, capsys: pytest.CaptureFixture) -> None:
    folder = searched["folder"]
    assert main(["front", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of tiny" in out and "MMACs" in out and "teacher" in out
    for name in ("front.csv", "trials.csv", "front.png", "front_3d.html"):
        assert (folder / name).stat().st_size > 0
    import pandas as pd

    front = pd.read_csv(folder / "front.csv")
    assert len(front) >= 1 and front["on_front"].all()


@pytest.mark.slow
def test_export_reproduces_trial_and_predict_matches(searched: dict, synthetic_root: Path, capsys) -> None:
    folder = searched["folder"]
    assert main(["export", str(folder), "--pick", "max-accuracy"]) == 0
    exports = list((folder / "export").iterdir())
    assert len(exports) == 1
    export = exports[0]
    for name in ("config.yaml", "model.pt", "model.json", "report.md", "report.json", "bundle/manifest.json"):
        assert (export / name).exists(), name
    report = json.loads((export / "report.json").read_text())
    exported = report["exported"]
    assert exported["val_accuracy"] == pytest.approx(exported["trial_val_accuracy"], abs=1e-9)
    assert 0 <= exported["test_accuracy"] <= 1
    assert report["baseline"]["latency"]["torch-fp32-eager"]["median_ms"] > 0
    assert set(exported["routing_overhead"]) == {"onnxruntime", "openvino"}  # model.onnx vs its experts
    assert "chosen experts alone" in (export / "report.md").read_text()
    # the deployed file against the study's int8 teacher, interleaved, with the MACs ratio beside the time ratio
    against = exported["against_teacher"]
    assert set(against) == {"batch_1", "batch_64"}
    for name, row in against.items():
        assert (
            row["batch"] == int(name.split("_")[1]) and row["latency_ratio"] > 0 and row["teacher_min_ms"] > 0
        )
        assert row["ratio_over_macs"] == pytest.approx(row["latency_ratio"] / row["macs_ratio"])
    assert "Against the study's int8 teacher" in (export / "report.md").read_text()
    # the weights load without unpickling code
    import torch

    torch.load(export / "model.pt", weights_only=True)
    # predict runs the bundle with ONNX Runtime alone and reproduces the export's test accuracy
    capsys.readouterr()
    assert (
        main(["predict", str(export / "bundle"), str(synthetic_root / "bloodmnist.npz"), "--limit", "3"]) == 0
    )
    out = capsys.readouterr().out
    accuracy = float(out.strip().splitlines()[-1].split()[1])
    assert accuracy == pytest.approx(exported["test_accuracy"], abs=1e-6)
    # exporting into an existing folder is refused unless --force
    trial = report["trial"]
    assert main(["export", str(folder), "--trial", str(trial)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_quantized_trial_reports_the_engine_weight_grid(searched: dict, tmp_path: Path) -> None:
    """Trials 1 and 2 are sampled (4- or 8-bit): NNI's sub-8-bit levels reach the int8 engine unchanged."""
    folder = searched["folder"]
    for trial in (1, 2):
        out = tmp_path / f"trial_{trial}"
        assert main(["export", str(folder), "--trial", str(trial), "--out", str(out)]) == 0
        exported = json.loads((out / "report.json").read_text())["exported"]
        assert exported["precision"] == "int8"
        grid = exported["engine_weight_grid"]
        assert grid["exact"] + grid["rounded"] > 0
        if exported["bits"] < 8:
            assert grid["exact"] > 0
        assert "int8 engine weights:" in (out / "report.md").read_text()


@pytest.mark.slow
def test_export_errors(searched: dict, capsys) -> None:
    folder = searched["folder"]
    assert main(["export", str(folder), "--trial", "99"]) == 2
    err = capsys.readouterr().err
    assert "--trial: 99" in err and "Traceback" not in err
    assert main(["export", str(folder), "--pick", "best"]) == 2
    assert "--pick" in capsys.readouterr().err
    # --force never deletes what hycomp did not write: the study folder, its parent, a user's folder
    user = folder.parent / "user_folder"
    user.mkdir(exist_ok=True)
    (user / "keep.txt").write_text("mine")
    before = sorted(str(path) for path in folder.parent.rglob("*"))
    for out in (folder, folder.parent, user):
        assert main(["export", str(folder), "--trial", "1", "--force", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and str(out) in err and "Traceback" not in err
    assert sorted(str(path) for path in folder.parent.rglob("*")) == before


@pytest.mark.slow
def test_export_retrains_candidates_and_exports_the_best_on_validation(
    searched: dict, tmp_path: Path, capsys, caplog
) -> None:
    """--candidates 2: both sampled trials are retrained at the full budget (kept in export/candidates/); the
    one with the better full-budget validation accuracy is exported as retrained, not trained a third time;
    a second run reuses the candidates."""
    caplog.set_level(logging.INFO, logger="hycomp")
    folder = searched["folder"]
    out = tmp_path / "best"
    command = ["export", str(folder), "--retrain", "--candidates", "2", "--out", str(out)]
    assert main(command) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["candidates"]
    assert len(rows) == 2 and {row["trial"] for row in rows} <= {1, 2}
    best = max(rows, key=lambda row: (row["full_budget_val_accuracy"], -row["mmacs"]))
    assert report["trial"] == best["trial"] and report["retrained_at_full_budget"]
    assert report["exported"]["val_accuracy"] == pytest.approx(best["full_budget_val_accuracy"], abs=1e-9)
    for row in rows:
        saved = json.loads(
            (folder / "export" / "candidates" / f"trial_{row['trial']}" / "candidate.json").read_text()
        )
        measured = TrialRecord.from_dict(saved["record"], "candidate").measurement
        assert measured.val_accuracy == row["full_budget_val_accuracy"] and saved["params"] == row["params"]
    assert "Candidates retrained at the full budget" in (out / "report.md").read_text()
    # minutes per model: each finished retraining is logged as it lands, with its val and the count
    progress = [r.getMessage() for r in caplog.records if "at the full budget: val" in r.getMessage()]
    assert len(progress) == 2 and all(
        re.match(r"export: model \d/2, candidate trial \d ", line) for line in progress
    )
    capsys.readouterr()
    assert main([*command, "--force"]) == 0
    assert json.loads((out / "report.json").read_text())["candidates"] == rows  # reused, same numbers
    # the quality experiment's exported row at the study's seed is that model, measured, not retrained
    from search.experiment import run

    experiment = run(folder, report["trial"], [0], tmp_path / "REPORT.md")
    saved = json.loads(experiment.with_suffix(".seeds.json").read_text())
    exported = next(entry for entry in saved if entry["row"] == "exported MoE")
    assert exported["from"] == str(folder / "export" / "candidates" / f"trial_{report['trial']}")
    assert exported["test"] == [pytest.approx(report["exported"]["test_accuracy"], abs=1e-9)]
    assert "measured here, not trained again" in experiment.read_text()
    # several candidates are a retraining choice: without --retrain the command says what to add
    assert main(["export", str(folder), "--candidates", "2"]) == 2
    err = capsys.readouterr().err
    assert "--candidates" in err and "--retrain" in err and "Traceback" not in err


def test_bad_space_exits_2_without_writing(tmp_path: Path, synthetic_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(tmp_path, synthetic_root, space={"pruner": ["l1", "magic"]})
    assert main(["search", "--space", str(space), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "space.pruner" in err and "magic" in err and "Valid values" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_unknown_expert_training_exits_2(tmp_path: Path, synthetic_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(tmp_path, synthetic_root, space={"expert_training": ["joint", "solo"]})
    assert main(["search", "--space", str(space), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        "space.expert_training" in err
        and "'solo'" in err
        and "group, joint" in err
        and "Traceback" not in err
    )
    assert not (tmp_path / "results").exists()


def test_missing_data_exits_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(tmp_path, tmp_path / "nowhere")
    assert main(["search", "--space", str(space), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bloodmnist.npz" in err and "--data-root" in err
    assert not (tmp_path / "results").exists()


def test_zero_trials_exits_2(tmp_path: Path, synthetic_root: Path, capsys) -> None:
    space = write_space(tmp_path, synthetic_root)
    assert main(["search", "--space", str(space), "--trials", "0", "--no-progress"]) == 2
    assert "trials" in capsys.readouterr().err


def test_unreachable_storage_exits_2(tmp_path: Path, synthetic_root: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(tmp_path, synthetic_root)
    code = main(
        [
            "search",
            "--space",
            str(space),
            "--storage",
            "postgresql://nobody@127.0.0.1:1/none",
            "--no-progress",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--storage" in err and "127.0.0.1:1" in err


def test_front_on_unknown_folder_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["front", str(tmp_path / "nothing")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_front_without_study_db_asks_for_the_storage(tmp_path: Path, capsys) -> None:
    """A folder whose search ran on --storage URL: say so, and do not create an empty study.db."""
    from search.config import dump_config, load_config

    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.yaml").write_text(dump_config(load_config(REPO / "search_spaces" / "tiny.yaml")))
    assert main(["front", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "no study.db" in err and "--storage" in err
    assert not (folder / "study.db").exists()


@pytest.mark.slow
def test_report_renders(searched: dict, capsys) -> None:
    folder = searched["folder"]
    assert main(["report", str(folder)]) == 0
    markdown = (folder / "report.md").read_text()
    assert "## Pareto front" in markdown and "## Search settings" in markdown and "front.png" in markdown
    assert "Baseline (fp32 teacher)" in markdown and "distil from" not in markdown  # one teacher
    page = (folder / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<img" in page
    # a study with several teachers names the ensemble the students distil from
    from search.report import write_report
    from search.study import load_study

    cfg, study = load_study(folder)
    record = study.user_attrs["baseline"]
    ensemble = {"members": ["a", "b"], "member_test_accuracy": [0.5, 0.25], "val_accuracy": 0.75}
    study.set_user_attr("baseline", {**record, "ensemble": {**ensemble, "test_accuracy": 0.625}})
    try:
        markdown = write_report(cfg, study, folder)[0].read_text()
    finally:
        study.set_user_attr("baseline", record)
    assert "distil from 2 teachers" in markdown and "0.5000, 0.2500" in markdown and "test 0.6250" in markdown


def test_front_export_report_on_an_empty_study_exit_2(tmp_path: Path, capsys) -> None:
    from search.config import dump_config, load_config
    from search.storage import default_storage, make_storage
    from search.study import open_study

    folder = tmp_path / "empty"
    folder.mkdir()
    cfg = load_config(REPO / "search_spaces" / "tiny.yaml")
    (folder / "config.yaml").write_text(dump_config(cfg))
    open_study(cfg, make_storage(default_storage(folder)))
    before = sorted(path.name for path in folder.iterdir())
    for argv in (["front", str(folder)], ["export", str(folder), "--pick", "knee"], ["report", str(folder)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no completed trials" in err and "hycomp search" in err and "Traceback" not in err
    assert sorted(path.name for path in folder.iterdir()) == before


@pytest.mark.slow
def test_predict_rejects_wrong_image_shape(searched: dict, tmp_path: Path, capsys) -> None:
    exports = sorted((searched["folder"] / "export").glob("*/bundle"))
    if not exports:  # the export test has not run in this session: make one
        assert main(["export", str(searched["folder"]), "--pick", "min-latency", "--force"]) == 0
        exports = sorted((searched["folder"] / "export").glob("*/bundle"))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    assert main(["predict", str(exports[0]), str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "32x32" in err and "28x28" in err and "Resize" in err and "Traceback" not in err


@pytest.mark.slow
def test_quality_experiment_writes_its_report(searched: dict, tmp_path: Path) -> None:
    """search.experiment on the searched study: every row, seeds, a control of equal MACs, a plot."""
    from search.experiment import run

    folder = searched["folder"]
    out = run(folder, 1, [0, 1], tmp_path / "REPORT.md", jobs=2)  # (row, seed) pairs in two processes
    text = out.read_text()
    rows = json.loads(out.with_suffix(".json").read_text())
    saved = json.loads(out.with_suffix(".seeds.json").read_text())  # each (row, seed) saved as it finished
    assert sorted((entry["row"], entry["seed"]) for entry in saved) == sorted(
        (name, seed) for name in rows if name != "teacher" and "note" not in rows[name] for seed in (0, 1)
    )
    assert len(rows["exported MoE"]["latency_ms"]) == 2 and "--jobs 2" in text
    assert {"teacher", "exported MoE", "no-search control"} <= set(rows)
    single = rows["exported MoE"]["params"]["num_experts"] == 1  # then the report does not call it a MoE
    for name in ("exported MoE", "no-search control"):
        assert len(rows[name]["test"]) == 2 and all(0 <= value <= 1 for value in rows[name]["test"])
    assert "| no-search control |" in text
    assert ("| exported (a single model: 1 expert) |" if single else "| exported MoE |") in text
    assert text.startswith(f"# bloodmnist: exported {'model' if single else 'MoE'} vs")
    # the control's width is chosen so that its MACs match the exported MoE's (channels round: within 25%)
    assert rows["no-search control"]["mmacs"] == pytest.approx(rows["exported MoE"]["mmacs"], rel=0.25)
    assert "--trial 1 --seeds 0 1" in text
    assert ("Exported model (1 expert) minus control" if single else "Exported MoE minus control") in text
    assert out.with_suffix(".png").stat().st_size > 5_000 and "REPORT.png" in text
    # extending it with --also runs only the new row; every saved (row, seed) is reused
    other = 0  # the uncompressed reference trial: never the best single (that needs pruning), cheap to re-run
    again = run(folder, 1, [0, 1], out, also=(other,))
    text = again.read_text()
    extended = json.loads(again.with_suffix(".json").read_text())
    assert f"{len(saved)} (row, seed) result(s) reused" in text and f"--also {other}" in text
    assert extended["exported MoE"]["test"] == rows["exported MoE"]["test"]
    assert len(extended[f"trial {other}"]["test"]) == 2 and f"| trial {other} |" in text
    # --report-only: a report from the saved pairs alone (nothing trains), saying which seeds each row holds
    saved_before = out.with_suffix(".seeds.json").read_text()
    partial = run(folder, 1, [0, 1, 2], out, report_only=True)
    text = partial.read_text()
    assert "Partial report" in text and "`no-search control` seed 2" in text and "(2 of 3 seeds)" in text
    assert out.with_suffix(".seeds.json").read_text() == saved_before
    with pytest.raises(ConfigError, match="holds no finished"):
        run(folder, 1, [5], tmp_path / "elsewhere" / "REPORT.md", report_only=True)


# ---------------------------------------------- every mistake caught before anything is written (issue 28)


@pytest.fixture
def workspace(tmp_path: Path, synthetic_root: Path, monkeypatch) -> dict:
    """A results root holding one file, the working directory beside it, and a valid space file."""
    results = tmp_path / "work" / "results"
    results.mkdir(parents=True)
    (results / "keep.txt").write_text("an earlier result")
    monkeypatch.setenv("HYCOMP_RESULTS", str(results))
    monkeypatch.chdir(tmp_path / "work")
    (tmp_path / "valid").mkdir()
    space = write_space(tmp_path / "valid", synthetic_root)
    return {"root": tmp_path, "space": space, "data": synthetic_root}


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def refused(argv: list[str], expected: list[str], workspace: dict, capsys) -> str:
    """``hycomp argv`` exits 2 with one message holding every ``expected`` fragment, no traceback, and
    nothing written anywhere under the test's folder (results root, its parent, the space file's folder)."""
    capsys.readouterr()
    before = _tree(workspace["root"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert _tree(workspace["root"]) == before
    return err


def _space_with(workspace: dict, **sections) -> str:
    return str(write_space(workspace["root"], workspace["data"], **sections))


@pytest.mark.parametrize(
    "name", ["..", ".", "../..", ".hidden", "a/b", "../outside", "/abs", "x y", "a:b", "n" * 101]
)
def test_a_study_name_outside_its_own_folder_is_refused(name: str, workspace: dict, capsys) -> None:
    space = _space_with(workspace, study={"name": name})
    err = refused(
        ["search", "--space", space, "--no-progress"], ["study.name", repr(name)], workspace, capsys
    )
    assert "results root" in err and "letters, digits" in err and "--storage" not in err
    refused(
        ["search", "--space", str(workspace["space"]), "--study-name", name, "--no-progress"],
        ["--study-name (study.name)", repr(name), "letters, digits"],
        workspace,
        capsys,
    )


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"study": {"sampler": {"name": "tpe", "options": {"n_startup_trials": "x"}}}},
            ["study.sampler.options.n_startup_trials", "'x'", "n_startup_trials: 10"],
        ),
        (
            {"study": {"sampler": {"name": "tpe", "options": {"popsize": 4}}}},
            ["study.sampler.options.popsize", "unknown option", "n_startup_trials"],
        ),
        (
            {"study": {"sampler": {"name": "nsga2", "options": {"population_size": 0}}}},
            ["study.sampler.options.population_size", "0", "> 0"],
        ),
        (
            {"study": {"sampler": {"name": "tpe", "seed": -1}}},
            ["study.sampler.seed", "-1", "[0, 2147483647]"],
        ),
        ({"space": {"sparsity": {"low": 0.3, "high": 0.7, "step": 0}}}, ["space.sparsity.step", "0", "> 0"]),
        ({"space": {"num_experts": {"low": 1, "high": 3, "step": -1}}}, ["space.num_experts.step", "-1"]),
        ({"space": {"top_k": {"low": 2, "high": 1}}}, ["space.top_k", "low 2 > high 1", "swap"]),
        ({"baseline": {"batch_size": 0}}, ["baseline.batch_size", "0", ">= 2"]),
        ({"trial": {"batch_size": -1}}, ["trial.batch_size", "-1", ">= 2"]),
        ({"study": {"timeout_minutes": -1}}, ["study.timeout_minutes", "-1", "null"]),
        ({"study": {"trials": 0}}, ["study.trials", "0", "e.g. 8"]),
        ({"baseline": {"lr": float("nan")}}, ["baseline.lr", "nan", "finite number"]),
        ({"baseline": {"lr": 50.0}}, ["baseline.lr", "50.0", "[1e-06, 10.0]"]),
        ({"export": {"qat_epochs": float("inf")}}, ["export.qat_epochs", "inf"]),
    ],
)
def test_late_validation_fails_before_the_study_folder(
    sections: dict, expected: list[str], workspace, capsys
) -> None:
    space = _space_with(workspace, **sections)
    err = refused(["search", "--space", space, "--no-progress"], expected, workspace, capsys)
    assert "train." not in err and "budget." not in err  # the user's names, not the pipelines'
    refused(["baseline", "--space", space], expected, workspace, capsys)  # the teacher is not trained either


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", ["--space", "is empty", "study:", "space:"]),
        (b"# only a comment\n\n", ["--space", "is empty", "tiny.yaml"]),
        (b"data: {dataset: bloodmnist}\n", ["no `study:` or `space:` section", "tiny.yaml"]),
        (bytes(range(256)), ["--space", "not a text file", "search_spaces/"]),
        (
            b"study:\n  name: a\n  trials: 2\n  trials: 3\nspace: {}\n",
            ["'trials' is written twice", "line 4"],
        ),
        (b"- a\n- list\n", ["space file", "expected a mapping"]),
    ],
)
def test_a_bad_space_file_is_named(content: bytes, expected: list[str], workspace: dict, capsys) -> None:
    path = workspace["root"] / "bad.yaml"
    path.write_bytes(content)
    refused(["search", "--space", str(path), "--no-progress"], [str(path), *expected], workspace, capsys)


def test_a_folder_as_space_is_named(workspace: dict, capsys) -> None:
    folder = workspace["root"]
    refused(["search", "--space", str(folder)], ["--space", str(folder), "is a folder"], workspace, capsys)
    refused(["baseline", "--space", str(folder)], ["--space", str(folder), "is a folder"], workspace, capsys)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--workers", "0"], ["--workers", "0 must be >= 1", "e.g."]),
        (["--workers", "-3"], ["--workers", "-3 must be >= 1"]),
        (["--workers", "two"], ["--workers", "'two' is not a whole number"]),
        (["--trials", "0"], ["--trials", "0 must be >= 1"]),
        (["--trials", "-1"], ["--trials", "-1 must be >= 1"]),
        (["--seed", "-1"], ["--seed", "-1 must be >= 0"]),
        (["--seed", str(2**40)], ["--seed (seed)", str(2**40), "[0, 2147483647]"]),
        (["--max-mmacs", "0"], ["--max-mmacs", "0 must be a finite number > 0", "e.g."]),
        (["--max-latency-ms", "-1"], ["--max-latency-ms", "-1 must be a finite number > 0"]),
        (["--max-size-kb", "nan"], ["--max-size-kb", "nan must be a finite number"]),
        (["--max-size-kb", "inf"], ["--max-size-kb", "inf must be a finite number"]),
        (["--min-accuracy", "1.5"], ["--min-accuracy", "1.5", "[0, 1]"]),
        (["--min-accuracy=-inf"], ["--min-accuracy", "-inf", "[0, 1]"]),
        (["--sampler", "cmaes"], ["--sampler (study.sampler.name)", "'cmaes'", "nsga2"]),
    ],
)
def test_search_flags_are_checked_up_front(flags: list[str], expected: list[str], workspace, capsys) -> None:
    refused(
        ["search", "--space", str(workspace["space"]), *flags, "--no-progress"], expected, workspace, capsys
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["baseline", "--jobs", "0"], ["--jobs", "0 must be >= 1"]),
        (["baseline", "--jobs", "-2"], ["--jobs", "-2 must be >= 1"]),
        (["export", "--candidates", "0"], ["--candidates", "0 must be >= 1"]),
        (["export", "--jobs", "-1"], ["--jobs", "-1 must be >= 1"]),
        (["export", "--trial", "-1"], ["--trial", "-1 must be >= 0"]),
        (["export", "--max-mmacs", "0"], ["--max-mmacs", "0 must be a finite number > 0"]),
        (["export", "--max-latency-ms", "nan"], ["--max-latency-ms", "nan must be a finite number"]),
        (["predict", "--threads", "0"], ["--threads", "0 must be >= 1"]),
        (["predict", "--limit", "0"], ["--limit", "0 must be >= 1"]),
        (["predict", "--limit", "-5"], ["--limit", "-5 must be >= 1"]),
    ],
)
def test_other_numeric_flags_are_checked_up_front(
    argv: list[str], expected: list[str], workspace, capsys
) -> None:
    command, *flags = argv
    positional = {
        "baseline": ["--space", str(workspace["space"])],
        "export": [str(workspace["root"] / "work" / "results" / "tiny")],
        "predict": [str(workspace["root"] / "bundle"), str(workspace["root"] / "images.npz")],
    }[command]
    refused([command, *positional, *flags], expected, workspace, capsys)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--pick", "best"], ["--pick", "'best'", "max-accuracy, knee"]),
        (["--trial", "1", "--pick", "best"], ["--pick", "'best'", "Valid values"]),  # invalid: refused always
        (["--trial", "1", "--pick", "knee"], ["--trial 1 and --pick knee", "Give one"]),
        (["--trial", "1", "--max-mmacs", "2"], ["--trial 1 and --max-mmacs", "Give one"]),
        (["--pick", "knee", "--max-size-kb", "40"], ["--pick knee and --max-size-kb", "they combine"]),
    ],
)
def test_export_chooses_its_trial_one_way(flags: list[str], expected: list[str], workspace, capsys) -> None:
    """Checked before the study is opened: the folder need not exist for the message to be about the flags."""
    refused(
        ["export", str(workspace["root"] / "work" / "results" / "tiny"), *flags], expected, workspace, capsys
    )


def test_an_unknown_latency_engine_is_refused_with_the_valid_names(workspace, capsys) -> None:
    space = _space_with(workspace, measure={"engine": "tensorrt"})
    refused(
        ["search", "--space", space, "--no-progress"],
        ["measure.engine", "'tensorrt'", "Valid values: auto, onnxruntime, openvino"],
        workspace,
        capsys,
    )


def test_a_latency_engine_that_is_not_installed_is_named_with_the_fix(workspace, monkeypatch, capsys) -> None:
    from search import latency

    monkeypatch.setattr(latency, "engine_available", lambda name: name == "onnxruntime")
    space = _space_with(workspace, measure={"engine": "openvino"})
    refused(
        ["search", "--space", space, "--no-progress"],
        ["measure.engine", "'openvino' is not installed", "pip install openvino", "measure.engine: auto"],
        workspace,
        capsys,
    )


def test_experiment_single_from_a_folder_that_is_no_study_exits_2(
    searched: dict, tmp_path: Path, capsys
) -> None:
    code = main(
        ["experiment", str(searched["folder"]), "--trial", "1", "--single-from", str(tmp_path / "nothing")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "study folder" in err and "nothing" in err and "Traceback" not in err


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback(monkeypatch, capsys) -> None:
    """`hycomp front ... | head`: the pipe closes while the table is printed; the command stops quietly."""
    import os
    import sys

    from search import cli

    monkeypatch.setattr(cli.FrontCommand, "take_action", lambda self, args: print("row\n" * 100_000) or 0)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone: writing raises BrokenPipeError (Python ignores SIGPIPE)
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", pipe)
    assert cli.main(["front", "results/anything"]) == 1
    monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err
