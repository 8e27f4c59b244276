"""The study's latency yardstick: which engine it picks, that a resumed study keeps it, that a missing or
unknown engine is named with its fix, and that trials are timed against the teacher's bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest

from pipelines.errors import ConfigError
from pipelines.timing import LatencyStats
from search import latency
from search.config import parse_config
from search.latency import (
    LATENCY_KEY,
    LatencyReference,
    check_engine,
    choose_engine,
    deploy_reference,
    stored_reference,
    study_reference,
)


def _stats(median_ms: float) -> LatencyStats:
    return LatencyStats(
        min_ms=median_ms * 0.9,
        median_ms=median_ms,
        p10_ms=median_ms * 0.95,
        p90_ms=median_ms * 1.1,
        repeats=50,
        warmup=10,
        threads=1,
        batch=1,
        backend="fake",
        versions={},
    )


def _timer(medians: dict[str, float], calls: list[str] | None = None):
    """A stand-in for :func:`search.latency.time_quietly`: each engine's median is given."""

    def timer(folder: Path, engine: str, threads: int, repeats: int, image) -> LatencyStats:
        assert (folder / "manifest.json").exists() and threads == 1 and image.shape[0] == 1
        if calls is not None:
            calls.append(engine)
        return _stats(medians[engine])

    return timer


@pytest.fixture
def both_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both engines count as installed, whatever this machine has (the timing is faked)."""
    monkeypatch.setattr(latency, "engine_available", lambda name: True)


@pytest.fixture(scope="module")
def teacher(tiny_data):
    from pipelines.models import build_model

    return build_model("resnet8", tiny_data.channels, tiny_data.num_classes, 0.25).eval()


@pytest.fixture(scope="module")
def reference_folder(tiny_data, teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study folder holding the teacher's int8 bundle (deployed once for this module)."""
    folder = tmp_path_factory.mktemp("study")
    deploy_reference(parse_config({}), tiny_data, teacher, folder)
    return folder


def test_the_teacher_bundle_is_one_int8_expert_deployed_once(
    reference_folder: Path, tiny_data, teacher
) -> None:
    from pipelines.deploy.manifest import read_manifest

    bundle = latency.reference_bundle(reference_folder)
    manifest = read_manifest(bundle)
    assert manifest.precision == "int8" and manifest.num_experts == 1 and manifest.top_k == 1
    written = (bundle / "manifest.json").stat().st_mtime_ns
    assert deploy_reference(parse_config({}), tiny_data, teacher, reference_folder) == bundle
    assert (bundle / "manifest.json").stat().st_mtime_ns == written  # kept, not deployed again


def test_auto_picks_the_engine_that_runs_the_teacher_faster(both_installed, reference_folder: Path) -> None:
    image = np.zeros((1, 3, 28, 28), dtype="float32")
    bundle = latency.reference_bundle(reference_folder)
    for medians, expected in (
        ({"onnxruntime": 2.0, "openvino": 1.0}, "openvino"),
        ({"onnxruntime": 1.0, "openvino": 3.0}, "onnxruntime"),
    ):
        chosen = choose_engine(parse_config({}), bundle, image, _timer(medians))
        assert chosen.engine == expected and chosen.teacher_median_ms == medians[expected]
        assert chosen.teacher_min_ms == pytest.approx(0.9 * medians[expected])
        assert set(chosen.timings) == {"onnxruntime", "openvino"}  # both timings kept, for the log
        assert chosen.timings["openvino"]["median_ms"] == medians["openvino"]
        assert chosen.threads == 1 and chosen.batch == 1


def test_an_explicit_engine_is_the_only_one_timed(both_installed, reference_folder: Path) -> None:
    image = np.zeros((1, 3, 28, 28), dtype="float32")
    calls: list[str] = []
    cfg = parse_config({"measure": {"engine": "onnxruntime"}})
    timer = _timer({"onnxruntime": 5.0, "openvino": 1.0}, calls)
    chosen = choose_engine(cfg, latency.reference_bundle(reference_folder), image, timer)
    assert chosen.engine == "onnxruntime" and calls == ["onnxruntime"]


def test_auto_without_openvino_times_onnxruntime_only(monkeypatch, reference_folder: Path) -> None:
    monkeypatch.setattr(latency, "engine_available", lambda name: name == "onnxruntime")
    assert latency.candidate_engines("auto") == ("onnxruntime",)


def test_a_resumed_study_keeps_its_engine_and_teacher_latency(
    both_installed, tiny_data, teacher, reference_folder: Path, caplog
) -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    cfg = parse_config({})
    with caplog.at_level("INFO", logger="hycomp"):
        first = study_reference(
            cfg, tiny_data, teacher, reference_folder, study, _timer({"onnxruntime": 2.0, "openvino": 1.0})
        )
    assert first.engine == "openvino"
    assert "latency engine: openvino" in caplog.text and "onnxruntime 2.000 ms" in caplog.text
    assert stored_reference(study) == first and study.user_attrs[LATENCY_KEY]["format"] == 1
    # resumed (or a worker): the stored choice, even where the engines now time the other way round
    calls: list[str] = []
    again = study_reference(
        cfg, tiny_data, teacher, reference_folder, study, _timer({"onnxruntime": 1.0, "openvino": 9.0}, calls)
    )
    assert again == first and calls == []
    with pytest.raises(
        ConfigError, match="measure.engine: 'onnxruntime', but study .* times its trials on 'openvino'"
    ):
        study_reference(
            parse_config({"measure": {"engine": "onnxruntime"}}), tiny_data, teacher, reference_folder, study
        )
    with pytest.raises(ConfigError, match="measure.latency_threads: 2, but .* 1 thread"):
        study_reference(
            parse_config({"measure": {"latency_threads": 2}}), tiny_data, teacher, reference_folder, study
        )


def test_a_study_deployed_with_another_int8_recipe_takes_no_new_trials(
    both_installed, tiny_data, teacher, reference_folder: Path
) -> None:
    """Trials deployed by another int8 recipe than the study's teacher would be timed on another scale: a
    search refuses to add them, a re-measure of the existing files goes on."""
    from pipelines.deploy.int8 import INT8_RECIPE

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    cfg = parse_config({})
    made = study_reference(
        cfg, tiny_data, teacher, reference_folder, study, _timer({"onnxruntime": 1.0, "openvino": 2.0})
    )
    assert made.int8_recipe == INT8_RECIPE
    older = {
        key: value for key, value in made.to_dict().items() if key != "int8_recipe"
    }  # made before recipes
    study.set_user_attr(LATENCY_KEY, older)
    assert stored_reference(study).int8_recipe == 1
    with pytest.raises(
        ConfigError, match=f"int8 recipe 1, and this hycomp deploys recipe {INT8_RECIPE}.*new study"
    ):
        study_reference(cfg, tiny_data, teacher, reference_folder, study)
    assert (
        study_reference(cfg, tiny_data, teacher, reference_folder, study, new_trials=False).int8_recipe == 1
    )


def test_unknown_or_missing_engines_are_named_with_the_fix(monkeypatch) -> None:
    with pytest.raises(
        ConfigError,
        match=r"measure.engine: unknown value 'tensorrt'. Valid values: auto, onnxruntime, openvino",
    ):
        parse_config({"measure": {"engine": "tensorrt"}})
    monkeypatch.setattr(latency, "engine_available", lambda name: name == "onnxruntime")
    with pytest.raises(
        ConfigError, match=r"'openvino' is not installed.*pip install openvino.*measure.engine: auto"
    ):
        check_engine("openvino")
    check_engine("auto")  # auto settles for what is installed
    check_engine("onnxruntime")


def test_a_reference_round_trips_and_a_foreign_one_is_refused() -> None:
    reference = LatencyReference("onnxruntime", "1.0", 1, 1, 0.9, 1.0, {"onnxruntime": {"median_ms": 1.0}})
    assert LatencyReference.from_dict(reference.to_dict(), "here") == reference
    with pytest.raises(ConfigError, match="here: latency reference format 7"):
        LatencyReference.from_dict({**reference.to_dict(), "format": 7}, "here")
    with pytest.raises(ConfigError, match="without \\['engine'\\]"):
        LatencyReference.from_dict(
            {key: value for key, value in reference.to_dict().items() if key != "engine"}, "here"
        )


def test_a_study_with_trials_timed_alone_is_warned_about(
    both_installed, tiny_data, teacher, reference_folder, caplog
) -> None:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 1.0, 0.5]))
    with caplog.at_level("WARNING", logger="hycomp"):
        study_reference(
            parse_config({}),
            tiny_data,
            teacher,
            reference_folder,
            study,
            _timer({"onnxruntime": 1.0, "openvino": 2.0}),
        )
    assert "1 completed trial(s) were timed alone" in caplog.text and "--remeasure" in caplog.text


def test_block_time_is_measured_once_for_a_space_that_ranks_by_latency(tmp_path, monkeypatch) -> None:
    """study_block_time measures each block's share at measure.throughput_batch on the study's engine and keeps
    it in the study folder; a space without latency ranking (or without removed blocks) measures nothing;
    a missing file names the fix."""
    import pytest
    import torch

    from pipelines.errors import ConfigError
    from search import latency
    from search.config import parse_config
    from search.latency import BLOCK_TIME_FILE, LatencyReference, read_block_time, study_block_time

    calls = []

    def fake(teacher, images, *, engine, threads, batch):
        calls.append((engine, threads, batch, len(images)))
        return {"layers.0.1": 0.17, "layers.2.2": 0.05}

    monkeypatch.setattr(latency, "block_time_shares", fake)
    data = type("Data", (), {"train": type("Split", (), {"images": torch.zeros(300, 3, 8, 8)})()})()
    reference = LatencyReference("openvino", "2026.4", 1, 1, 0.2, 0.25)
    plain = parse_config({"space": {"blocks_removed": {"low": 0, "high": 4}}})
    study_block_time(plain, data, None, tmp_path, reference)
    assert calls == [] and not (tmp_path / BLOCK_TIME_FILE).exists()
    with pytest.raises(ConfigError, match="re-run `hycomp search`"):
        read_block_time(tmp_path)
    ranked = parse_config(
        {
            "space": {"blocks_removed": {"low": 0, "high": 4}, "block_ranking": ["latency"]},
            "measure": {"throughput_batch": 32},
        }
    )
    study_block_time(ranked, data, None, tmp_path, reference)
    study_block_time(ranked, data, None, tmp_path, reference)  # a resumed run or a worker: kept, not re-timed
    assert calls == [("openvino", 1, 32, 128)]
    assert read_block_time(tmp_path) == {"layers.0.1": 0.17, "layers.2.2": 0.05}
