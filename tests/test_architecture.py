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


def _module_name(path: Path, root: Path) -> str:
    """``search/study.py`` -> ``search.study``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_dotted(path: Path, root: Path) -> set[str]:
    """Full dotted names of every module ``path`` imports, at any depth (function-level too); relative
    imports resolved against its package. ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (c may be a
    module); the graph keeps only names that are project modules."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module of ``packages`` under ``root``."""
    files = [path for package in packages for path in sorted((root / package).rglob("*.py"))]
    modules = {_module_name(path, root): path for path in files}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_dotted(path, root):
            # an import of a.b.c also runs a and a.b: count the deepest project module it names
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


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


def test_no_import_cycles_between_project_modules() -> None:
    """search.* and pipelines.* import each other one way only, counting imports inside functions (a lazy
    import hides a cycle from Python, not from the design)."""
    graph = _import_graph(REPO, ("search", "pipelines"))
    assert len(graph) >= 30 and "search.study" in graph
    assert _cycles(graph) == []


def test_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """A synthetic package whose modules import each other, one of them inside a function, relatively."""
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from loop.second import helper\n")
    (package / "second.py").write_text("def helper():\n    from .first import thing\n")
    (package / "third.py").write_text("import loop.first\n")
    graph = _import_graph(tmp_path, ("loop",))
    assert graph["loop.third"] == {"loop.first"}
    assert _cycles(graph) == [["loop.first", "loop.second"]]
