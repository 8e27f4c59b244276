"""Reliability: crashing trials fail alone, Ctrl-C and SIGKILL lose nothing and resume, tampered files
are refused, the same seed gives the same start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from pipelines.errors import CompressionError, UntrustedFileError
from search.cli import main
from search.record import KILLED, TrialRecord

REPO = Path(__file__).resolve().parents[2]


def write_space(folder: Path, data_root: Path, name: str, trials: int = 3, **sections) -> Path:
    mapping = yaml.safe_load((REPO / "search_spaces" / "tiny.yaml").read_text())
    mapping["data"]["root"] = str(data_root)
    mapping["study"]["name"] = name
    mapping["study"]["trials"] = trials
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / name / 'study.db'}")


@pytest.mark.slow
def test_crashing_trial_fails_alone(tmp_path: Path, synthetic_root: Path, monkeypatch, capsys) -> None:
    import search.evaluation as evaluation

    real = evaluation.compress_hybrid
    calls = {"count": 0}

    def flaky(teacher, data, cfg, budget, seed=0, sources=None, on_stage=None):
        calls["count"] += 1
        if calls["count"] == 2:  # the first sampled trial after the reference
            raise CompressionError(
                "NNI ModelSpeedup failed: EmptyLayerError: an expert was pruned to nothing"
            )
        return real(teacher, data, cfg, budget, seed=seed, sources=sources, on_stage=on_stage)

    monkeypatch.setattr(evaluation, "compress_hybrid", flaky)
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(tmp_path, synthetic_root, "crash", trials=2)
    assert main(["search", "--space", str(space), "--no-progress"]) == 0
    study = load(tmp_path / "results", "crash")
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert "EmptyLayerError" in TrialRecord.of(failed).fail_reason
    capsys.readouterr()
    assert main(["front", str(tmp_path / "results" / "crash")]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "EmptyLayerError" in out


@pytest.mark.slow
def test_nan_loss_is_a_failed_trial_not_a_crash(
    tmp_path: Path, synthetic_root: Path, monkeypatch, capsys
) -> None:
    import pipelines.train as train_module

    # The distillation loss turns NaN (as a diverging run does): each trial fails with that reason, is
    # recorded, and after five failures in a row the search stops with an error instead of burning time.
    monkeypatch.setattr(train_module, "distillation_loss", lambda *args: torch.tensor(float("nan")))
    monkeypatch.setenv("HYCOMP_RESULTS", str(tmp_path / "results"))
    space = write_space(
        tmp_path,
        synthetic_root,
        "nan",
        trials=1,
        space={"sparsity": {"low": 0.5, "high": 0.5}},  # pruned, so the KD fine-tune runs
        study={"enqueue_baseline": False, "timeout_minutes": 0.5},
    )
    assert main(["search", "--space", str(space), "--no-progress"]) == 2
    assert "the last 5 trials all failed" in capsys.readouterr().err
    study = load(tmp_path / "results", "nan")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == len(study.trials) == 5
    assert all("diverged" in TrialRecord.of(t).fail_reason for t in failed)


def _search_process(space: Path, results: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HYCOMP_RESULTS": str(results), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", "search", "--space", str(space), "--no-progress"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that runs the tests in the background (`pytest &`) ignores SIGINT, and children inherit
        # that: give the search Ctrl-C's default, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_running_trial(
    process: subprocess.Popen, results: Path, name: str, after: int, timeout: float = 240
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:  # the search ended before a trial could be caught running: say why
            out, err = process.communicate()
            raise AssertionError(
                f"the search exited ({process.returncode}) before trial {after} ran:\n{out[-2000:]}\n{err[-4000:]}"
            )
        if (results / name / "study.db").exists():
            try:
                study = load(results, name)
                if any(t.state == TrialState.RUNNING and t.number >= after for t in study.trials):
                    return
            except Exception:  # the study may not exist yet
                pass
        time.sleep(0.5)
    process.kill()
    out, err = process.communicate()
    raise AssertionError(f"no trial {after} or later started in {timeout} s:\n{out[-2000:]}\n{err[-4000:]}")


@pytest.mark.slow
def test_ctrl_c_marks_running_trial_and_resumes(tmp_path: Path, synthetic_root: Path) -> None:
    results = tmp_path / "results"
    # trials long enough (seconds) that the signal lands inside one, not after the study has ended
    space = write_space(tmp_path, synthetic_root, "interrupt", trials=3, trial={"finetune_epochs": 40})
    process = _search_process(space, results)
    _wait_for_running_trial(process, results, "interrupt", after=1)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "interrupted" in err and "Re-run the same command to resume" in err and "Traceback" not in err
    study = load(results, "interrupt")
    assert any(t.state == TrialState.FAIL for t in study.trials)
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    kept = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    # resume: the same command finishes the study without redoing completed trials
    process = _search_process(space, results)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    study = load(results, "interrupt")
    complete = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    evaluated = [
        t for t in study.trials if t.state == TrialState.COMPLETE and not TrialRecord.of(t).is_repeat
    ]
    assert len(evaluated) == 3 and set(kept) <= set(complete)


@pytest.mark.slow
def test_sigkill_mid_trial_resumes_and_retries(tmp_path: Path, synthetic_root: Path) -> None:
    results = tmp_path / "results"
    # trials long enough (seconds) that the kill lands inside one, not between its last write and the tell
    space = write_space(tmp_path, synthetic_root, "killed", trials=3, trial={"finetune_epochs": 40})
    fast_heartbeat = {"HYCOMP_HEARTBEAT_SECONDS": "1", "HYCOMP_GRACE_SECONDS": "3"}
    process = _search_process(space, results, fast_heartbeat)
    _wait_for_running_trial(process, results, "killed", after=1)
    time.sleep(1.0)
    process.kill()
    process.communicate(timeout=60)
    study = load(results, "killed")
    killed = next(t for t in study.trials if t.state == TrialState.RUNNING)
    time.sleep(4)  # let the heartbeat go stale
    process = _search_process(space, results, fast_heartbeat)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    study = load(results, "killed")
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed.number].state == TrialState.FAIL
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len([t for t in complete if not TrialRecord.of(t).is_repeat]) == 3
    assert TrialRecord.of(by_number[killed.number]).fail_reason == KILLED
    # Optuna's retry callback re-ran the killed configuration
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert retried and retried[0].params == killed.params


def test_tampered_teacher_is_refused(tmp_path: Path, tiny_data) -> None:
    from pipelines.models import ModelSpec
    from pipelines.serialize import describe_model, save_checkpoint
    from search.baseline import load_teacher

    spec = ModelSpec("resnet8", width=0.5)
    save_checkpoint(spec.build(3, 8, 28), tmp_path / "teacher", describe_model(spec, 3, 8, 28))
    assert load_teacher(tmp_path) is not None
    data = (tmp_path / "teacher.pt").read_bytes()
    (tmp_path / "teacher.pt").write_bytes(data[:-10] + bytes(10))
    with pytest.raises(UntrustedFileError, match="was modified"):
        load_teacher(tmp_path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """A .pt whose hash was updated to match but which carries pickled code still does not load."""
    import pickle

    from pipelines.files import sha256_file
    from pipelines.serialize import FORMAT_VERSION, load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "model.pt").write_bytes(pickle.dumps({"weight": Evil()}))
    (tmp_path / "model.json").write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "description": {},
                "layers": {},
                "sha256": sha256_file(tmp_path / "model.pt"),
            }
        )
    )
    with pytest.raises(UntrustedFileError, match="not a plain tensor file"):
        load_checkpoint(tmp_path / "model")
