"""The import graph holds the layering of docs/architecture.md: no cycles, no import
from a lower layer to a higher one, the services never reach into each other, and
nothing shipped imports the test suite or the benchmarks."""

from __future__ import annotations

import ast
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Layer -> the layers it may import (itself included). Longest prefix wins.
ALLOWED: dict[str, set[str]] = {
    "vigil": {"vigil.core"},  # its __version__ is vigil.core.version's
    "vigil.v1": {"vigil.v1"},
    "vigil.core": {"vigil.v1", "vigil.core"},
    "vigil.client": {"vigil.v1", "vigil.core", "vigil.client"},
    "vigil.example_agent": {"vigil.client"},
    "vigil.liveness_service": {"vigil.v1", "vigil.core", "vigil.liveness_service"},
    "vigil.task_service": {"vigil.v1", "vigil.core", "vigil.client", "vigil.task_service"},
    "vigil.daemon": {"vigil.v1", "vigil.core", "vigil.client", "vigil.daemon"},
    "vigil.server": {
        "vigil.v1",
        "vigil.core",
        "vigil.client",
        "vigil.liveness_service",
        "vigil.task_service",
        "vigil.server",
    },
    "vigil.testing": {
        "vigil.v1",
        "vigil.core",
        "vigil.client",
        "vigil.liveness_service",
        "vigil.task_service",
        "vigil.server",
        "vigil.testing",
    },
    "vigil.cli": {
        "vigil.v1",
        "vigil.core",
        "vigil.client",
        "vigil.liveness_service",
        "vigil.task_service",
        "vigil.daemon",
        "vigil.server",
        "vigil.testing",
        "vigil.cli",
    },
}
LAYERS = sorted(ALLOWED, key=len, reverse=True)


def _layer(module: str) -> str:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    raise AssertionError(f"{module} belongs to no layer")


def _modules(folder: Path, package: str) -> Iterator[tuple[str, Path]]:
    """Every module under `folder` (following the links of the design card's folders)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = Path(dirpath).relative_to(folder)
        parts = [package, *rel.parts] if rel.parts else [package]
        for name in filenames:
            if name.endswith(".py"):
                mod = parts if name == "__init__.py" else [*parts, name[:-3]]
                yield ".".join(mod), Path(dirpath) / name


def _imports(path: Path, module: str, *, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if module_level_only and isinstance(node, ast.If):
            continue  # `if TYPE_CHECKING:` blocks do not run
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                base = ".".join(pkg[: len(pkg) - node.level + (path.name == "__init__.py")])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = dict(_modules(ROOT / "vigil", "vigil"))


@functools.cache
def _edges(module_level_only: bool) -> dict[str, set[str]]:
    return {
        mod: {
            dep
            for dep in _imports(path, mod, module_level_only=module_level_only)
            if dep in MODULES and dep != mod
        }
        for mod, path in MODULES.items()
    }


def test_the_package_is_seen_through_its_links() -> None:
    for part in ("cli", "daemon", "liveness_service", "task_service"):
        assert f"vigil.{part}" in MODULES, part


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_or_sideways_import(module: str) -> None:
    layer = _layer(module)
    for dep in _edges(module_level_only=False)[module]:
        if dep.startswith("vigil.v1"):
            continue
        assert _layer(dep) in ALLOWED[layer] | {layer}, f"{module} imports {dep}"


def test_no_import_cycles() -> None:
    # A package's __init__ importing its own submodules is how a curated surface works.
    graph = {
        mod: {d for d in deps if not d.startswith(mod + ".")}
        for mod, deps in _edges(module_level_only=True).items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["vigil", "bench"])
def test_nothing_shipped_or_measured_imports_the_test_suite(folder: str) -> None:
    for path in (ROOT / folder).rglob("*.py"):
        for dep in _imports(path, path.stem, module_level_only=False):
            assert dep != "tests" and not dep.startswith("tests."), f"{path} imports {dep}"
            if folder == "vigil":
                assert not dep.startswith("bench"), f"{path} imports {dep}"
