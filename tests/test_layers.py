"""The package layers hold: the runtime imports nothing host-side, quantization and builds do not
import the facade, and no two packages import each other. Every import counts, including those
inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import mmedge

SRC = Path(mmedge.__file__).parent
PACKAGES = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
HOST_SIDE = {"models", "export", "calibration", "builds", "recipes", "sdk", "evaluation", "data"}


def _imports(path: Path) -> set[str]:
    """Every mmedge module a file imports, resolved to dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmedge")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("mmedge")
        ):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _package_graph() -> dict[str, set[str]]:
    """Top-level subpackage -> the other top-level subpackages its files import."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for pkg in PACKAGES:
        for file in (SRC / pkg).rglob("*.py"):
            for name in _imports(file):
                parts = name.split(".")
                if len(parts) > 1 and parts[1] in graph and parts[1] != pkg:
                    graph[pkg].add(parts[1])
    return graph


def test_the_layout_is_the_one_documented() -> None:
    assert {
        "runtime",
        "models",
        "export",
        "calibration",
        "builds",
        "recipes",
        "sdk",
        "data",
        "evaluation",
    } <= set(PACKAGES), PACKAGES


def test_runtime_imports_nothing_host_side() -> None:
    assert not _package_graph()["runtime"] & HOST_SIDE, _package_graph()["runtime"]


def test_quantization_and_builds_do_not_import_the_facade() -> None:
    graph = _package_graph()
    assert "sdk" not in graph["calibration"] and "sdk" not in graph["builds"]
    assert not {p for p, deps in graph.items() if "sdk" in deps}, "nothing imports the facade"


def test_no_two_packages_import_each_other() -> None:
    graph = _package_graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or reaches(nxt, goal, seen | {nxt}) for nxt in graph[start] - seen)

    cycles = sorted(p for p in graph if reaches(p, p, set()))
    assert not cycles, {p: sorted(graph[p]) for p in cycles}


def test_the_graph_scanner_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mmedge.sdk.store import resolve\n    import mmedge.models.registry\n")
    assert {"mmedge.sdk.store", "mmedge.models.registry"} <= _imports(f)
