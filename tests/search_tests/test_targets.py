"""search.targets: distillation targets computed once, kept with a checksum, reused by other processes,
and computed again (then replaced whole) when the kept file is damaged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.models import build_model
from search import targets
from search.targets import compute_targets, distillation_targets, targets_path

REPO = Path(__file__).resolve().parents[2]
KEYS = ("teacher-a", "teacher-b")


def _teachers(data) -> list[torch.nn.Module]:
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(build_model("resnet8", data.channels, data.num_classes, 0.25).eval())
    return teachers


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """How often the targets were computed in this process."""
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return compute_targets(*args, **kwargs)

    monkeypatch.setattr(targets, "compute_targets", counting)
    return calls


def test_targets_are_computed_once_and_loaded_after(tiny_data, tmp_path: Path, counted) -> None:
    teachers = _teachers(tiny_data)
    first = distillation_targets(teachers, KEYS, tiny_data, "flips", tmp_path)
    path = targets_path(KEYS, "flips", tiny_data, tmp_path)
    assert path.parent == tmp_path / "baselines" / "targets" and path.exists()
    assert json.loads(path.with_suffix(".json").read_text())["shape"] == list(first.shape)
    assert torch.allclose(first, compute_targets(teachers, tiny_data.train, "flips"))
    again = distillation_targets(teachers, KEYS, tiny_data, "flips", tmp_path)
    assert torch.equal(again, first) and len(counted) == 1
    # another augment or teacher set is another file
    distillation_targets(teachers, KEYS, tiny_data, "d4", tmp_path)
    distillation_targets(teachers[:1], KEYS[:1], tiny_data, "flips", tmp_path)
    assert len(counted) == 3 and len(list(path.parent.glob("*.pt"))) == 3


@pytest.mark.parametrize(
    "damage",
    ["garbage bytes", "checksum", "wrong shape", "no sidecar", "other format"],
)
def test_a_damaged_file_is_computed_again_and_replaced(tiny_data, tmp_path: Path, counted, damage) -> None:
    teachers = _teachers(tiny_data)[:1]
    expected = distillation_targets(teachers, KEYS[:1], tiny_data, "flips", tmp_path)
    path = targets_path(KEYS[:1], "flips", tiny_data, tmp_path)
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    if damage == "garbage bytes":
        path.write_bytes(b"not a tensor")
        sidecar.write_text(json.dumps({**record, "sha256": targets.sha256_file(path)}))
    elif damage == "checksum":
        torch.save(expected + 1, path)  # a readable tensor of the right shape, but not the one kept
    elif damage == "wrong shape":
        torch.save(expected[:3], path)
        sidecar.write_text(json.dumps({**record, "sha256": targets.sha256_file(path)}))
    elif damage == "no sidecar":
        sidecar.unlink()
    else:
        sidecar.write_text(json.dumps({**record, "format": targets.TARGETS_FORMAT + 1}))
    again = distillation_targets(teachers, KEYS[:1], tiny_data, "flips", tmp_path)
    assert len(counted) == 2 and torch.allclose(again, expected)
    distillation_targets(teachers, KEYS[:1], tiny_data, "flips", tmp_path)
    assert len(counted) == 2  # the replaced file is whole and checked
    assert not list(path.parent.glob("*.partial"))


_SECOND_PROCESS = """
import logging, sys
import torch
from pipelines.data import load_dataset
from pipelines.models import build_model
from search import targets

logging.basicConfig(level=logging.INFO, format="%(message)s")
data = load_dataset("bloodmnist", sys.argv[1], verify_md5=False)
torch.manual_seed(0)
teacher = build_model("resnet8", data.channels, data.num_classes, 0.25).eval()
def refuse(*args, **kwargs):
    raise SystemExit("computed the targets again")
targets.compute_targets = refuse
logits = targets.distillation_targets([teacher], ["teacher-a"], data, "flips", __import__("pathlib").Path(sys.argv[2]))
torch.save(logits, sys.argv[3])
"""


def test_a_second_process_loads_the_kept_targets(tiny_data, synthetic_root: Path, tmp_path: Path) -> None:
    teachers = _teachers(tiny_data)[:1]
    kept = distillation_targets(teachers, KEYS[:1], tiny_data, "flips", tmp_path)
    path = targets_path(KEYS[:1], "flips", tiny_data, tmp_path)
    written = path.stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, "-c", _SECOND_PROCESS, str(synthetic_root), str(tmp_path), str(tmp_path / "out.pt")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "distillation targets: loaded" in result.stderr
    assert path.stat().st_mtime_ns == written
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), kept)


def test_computing_targets_reports_progress(tiny_data, monkeypatch, caplog) -> None:
    """A long computation says how far it is: with the interval at 0, one line per batch of each teacher,
    and the last one at 100%."""
    import logging

    monkeypatch.setattr(targets, "PROGRESS_SECONDS", 0.0)
    teachers = _teachers(tiny_data)
    with caplog.at_level(logging.INFO, logger="hycomp"):
        compute_targets(teachers, tiny_data.train, "flips")
    lines = [
        record.getMessage()
        for record in caplog.records
        if "distillation targets: teacher" in record.getMessage()
    ]
    assert any(line.startswith("distillation targets: teacher 1/2") for line in lines)
    assert lines[-1].startswith("distillation targets: teacher 2/2") and "(100%" in lines[-1]
