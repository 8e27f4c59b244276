"""Export's folder rule: ``--force`` replaces an export hycomp wrote and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from search.export import EXPORT_KIND, check_target, default_target


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def _study(tmp_path: Path) -> Path:
    study = tmp_path / "results" / "mystudy"
    (study / "trials" / "trial_0").mkdir(parents=True)
    (study / "study.db").write_text("db")
    (study / "config.yaml").write_text("study: {}")
    return study


def _export(folder: Path, *extra: str) -> Path:
    (folder / "bundle").mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"kind": EXPORT_KIND}))
    (folder / "model.pt").write_text("weights")
    for name in extra:
        (folder / name).write_text("the user's own file")
    return folder


def test_a_new_or_empty_folder_is_accepted(tmp_path: Path) -> None:
    study = _study(tmp_path)
    check_target(tmp_path / "new", study, force=False)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", study, force=False)
    check_target(default_target(study, 3, retrain=True), study, force=False)
    assert default_target(study, 3, retrain=True).name == "trial_3_retrained"


def test_an_earlier_export_needs_force_and_force_replaces_it(tmp_path: Path) -> None:
    study = _study(tmp_path)
    earlier = _export(study / "export" / "trial_1")
    with pytest.raises(ConfigError, match="--force"):
        check_target(earlier, study, force=False)
    check_target(earlier, study, force=True)  # allowed: hycomp wrote every entry


@pytest.mark.parametrize("force", [False, True])
def test_the_study_folder_or_a_folder_holding_it_is_refused(tmp_path: Path, force: bool) -> None:
    study = _study(tmp_path)
    before = _tree(tmp_path)
    for target in (study, study.parent, tmp_path, study / ".." / study.name):
        with pytest.raises(ConfigError, match=r"--out: .*study folder.*Pass a new folder"):
            check_target(target, study, force=force)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_folders_hycomp_did_not_write_are_refused_even_with_force(tmp_path: Path, force: bool) -> None:
    study = _study(tmp_path)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_text("jpeg")
    mixed = _export(tmp_path / "mixed", "notes.txt")  # an export the user added a file to
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "report.json").write_text("{not json")
    a_file = tmp_path / "file.txt"
    a_file.write_text("text")
    before = _tree(tmp_path)
    for target in (unrelated, mixed, fake):
        with pytest.raises(ConfigError, match="not an export hycomp wrote.*Pass a new or empty folder"):
            check_target(target, study, force=force)
    with pytest.raises(ConfigError, match="is a file"):
        check_target(a_file, study, force=force)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(("ratio", "verdict"), [(0.6, "over"), (0.4, "within")])
def test_an_export_is_held_to_the_latency_per_mac(ratio: float, verdict: str, caplog) -> None:
    """The export report says whether model.onnx's latency ratio to the teacher at the throughput batch is
    within constraints.max_latency_per_mac times its MACs ratio, and warns when it is not."""
    from search.config import SearchConfig
    from search.export import _check_latency_per_mac
    from search.export_report import _against_teacher_line

    row = {
        "batch": 64, "latency_ratio": ratio, "min_ms": 1.0, "teacher_min_ms": 2.0, "macs_ratio": 0.3,
        "ratio_over_macs": ratio / 0.3, "engine": "onnxruntime 1.32.0", "threads": 1,
    }  # fmt: skip
    report = {"exported": {"against_teacher": {"batch_64": row}}}
    cfg = SearchConfig().replace(constraints={"max_latency_per_mac": 1.5})
    _check_latency_per_mac(report, cfg, 7)
    limit = report["exported"]["latency_per_mac_limit"]
    assert limit == {"batch": 64, "max_latency_per_mac": 1.5, "latency_per_mac": pytest.approx(ratio / 0.3)}
    line = _against_teacher_line(report["exported"]["against_teacher"], limit)[0]
    assert f"At batch 64: {verdict} constraints.max_latency_per_mac 1.50x" in line
    assert ("over constraints.max_latency_per_mac" in caplog.text) == (verdict == "over")
    unlimited = {"exported": {"against_teacher": {"batch_64": row}}}
    _check_latency_per_mac(unlimited, SearchConfig(), 8)  # no limit set: nothing to hold it to
    assert "latency_per_mac_limit" not in unlimited["exported"]


@pytest.mark.parametrize(("share", "verdict"), [(0.2, "over"), (0.05, "within")])
def test_a_multi_expert_export_is_held_to_the_routing_share(share: float, verdict: str, caplog) -> None:
    """The export report says whether model.onnx's batch-1 gate + routing share on the study's engine is
    within constraints.max_routing_share, and warns when it is not."""
    import optuna

    from search.config import SearchConfig
    from search.export import _check_routing_share
    from search.export_report import _routing_share_line

    timing = {"routing_share": share, "routing_share_min": share}
    report = {
        "params": {"num_experts": 2},
        "exported": {
            "latency": {"routing_share": 0.3},
            "routing_overhead": {"onnxruntime": {"batch_1": timing}, "openvino": {"batch_1": timing}},
        },
    }
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])  # no reference: ORT
    _check_routing_share(report, SearchConfig(), study, 7)
    limit = report["exported"]["routing_limit"]
    assert limit == {"engine": "onnxruntime", "max_routing_share": 0.1, "share": share}
    assert f"{verdict} constraints.max_routing_share 10% on the study's engine" in _routing_share_line(
        report["exported"]
    )
    assert ("over constraints.max_routing_share" in caplog.text) == (verdict == "over")
    exported = {key: value for key, value in report["exported"].items() if key != "routing_limit"}
    single = {"params": {"num_experts": 1}, "exported": exported}
    _check_routing_share(single, SearchConfig(), study, 8)
    assert "routing_limit" not in single["exported"]  # one net: no gate, nothing to hold
