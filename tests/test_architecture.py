"""Project rules that code review alone would miss: dependency direction, one NNI adapter, clean lint."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NNI_ADAPTER = REPO / "pipelines" / "compress" / "_nni.py"
SKIPPED_DIRS = {"tests", "results", "build", "dist"}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path`` (relative imports stay in their package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _source_files() -> list[Path]:
    """Every .py of the project outside tests, outputs and hidden folders (virtualenvs, caches)."""
    return [
        path
        for path in REPO.rglob("*.py")
        if not any(part.startswith(".") or part in SKIPPED_DIRS for part in path.relative_to(REPO).parts[:-1])
    ]


def test_pipelines_knows_nothing_of_optuna_or_search() -> None:
    files = sorted((REPO / "pipelines").rglob("*.py"))
    assert len(files) >= 10, "pipelines/ should hold the torch layer's modules"
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_modules(path) & {"optuna", "search"}) for path in files
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_nni_is_imported_only_by_its_adapter() -> None:
    files = _source_files()
    assert NNI_ADAPTER in files
    importers = sorted(str(path.relative_to(REPO)) for path in files if "nni" in _imported_modules(path))
    assert importers == ["pipelines/compress/_nni.py"]


def test_import_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    """The adapter imports NNI inside functions: make sure the scanner would catch a lazy import too."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    from nni.compression import x\n    import optuna.trial\n\nfrom . import sibling\n"
    )
    assert _imported_modules(sample) == {"nni", "optuna"}


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install ruff)"
)
def test_ruff_check_is_clean() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
