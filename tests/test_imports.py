"""The package's modules import each other without a circle, and algorithms never import the engine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tapl"
#: The engine: what algorithms must not import (they see it only through ``ClientContext`` and ``FederationInfo``).
ENGINE = ("tapl.federation", "tapl.engine", "tapl.cli", "tapl.compare")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_package(name: str, package: str) -> bool:
    """Whether module ``name`` is ``package`` or inside it."""
    return name == package or name.startswith(f"{package}.")


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """Every ``tapl`` module ``path`` imports anywhere (also under ``TYPE_CHECKING`` and inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def dependencies() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: its imports and their parent packages (but the root package,
    a facade, and the module's own parents, which Python has always run before it)."""
    found = modules()
    known = set(found)
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in imported(path, known):
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {t for t in edges if t in known and t != name and t not in own_parents}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    assert circles(dependencies()) == []


def test_the_circle_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_a_parent_package_counts_unless_it_is_the_importers_own() -> None:
    graph = dependencies()
    # tapl.engine.config imports tapl.sampling; its own package tapl.engine is not an edge back to itself.
    assert "tapl.sampling" in graph["tapl.engine.config"]
    assert "tapl.engine" not in graph["tapl.engine.config"]
    # Importing tapl.models.foundation also runs tapl.models (its __init__), which a circle could go through.
    assert {"tapl.models.foundation", "tapl.models"} <= graph["tapl.client"]


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("tapl.algorithms")))
def test_algorithms_never_import_the_engine(name: str) -> None:
    engine = {m for m in imported(modules()[name], set(modules())) if any(in_package(m, e) for e in ENGINE)}
    assert engine == set(), f"{name} imports the engine: {sorted(engine)}"
