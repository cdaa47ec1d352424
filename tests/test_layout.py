"""The house stays in rooms: no module of ``engine/`` or ``handlers/`` over 400 lines, no function over 60
(its docstring not counted), and an import graph without cycles in which ``engine`` never imports
``handlers`` and no handler imports the front door (``fit``, ``attach``, ``evaluate``, ``cli``, ``launch``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("engine", "handlers")
MODULE_LINES, FUNCTION_LINES = 400, 60
FRONT_DOOR = {"handlers", "handlers.fit", "handlers.attach", "handlers.evaluate", "handlers.cli", "handlers.launch"}
SOURCES = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def function_lengths(tree: ast.AST) -> dict[str, int]:
    """Lines of each function and method, from its ``def`` (decorators left out) to its end, less its docstring."""
    lengths = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            doc = first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str) else 0
            lengths[f"{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1 - doc
    return lengths


def imports_of(path: Path) -> set[str]:
    """The modules of our packages that ``path`` imports, wherever in it (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    typing_only = [node for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    skipped = {id(n) for node in typing_only for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    known = {module_name(p) for p in SOURCES}
    return {name for name in found if name in known and name.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_and_function_is_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MODULE_LINES
    long = {name: n for name, n in function_lengths(ast.parse(text)).items() if n > FUNCTION_LINES}
    assert not long, long


def test_the_import_graph_has_no_cycle_and_points_down():
    graph = {module_name(p): imports_of(p) - {module_name(p)} for p in SOURCES}
    for module, imported in graph.items():
        if module.startswith("engine"):
            assert not any(name.startswith("handlers") for name in imported), (module, imported)
        elif module not in FRONT_DOOR:
            assert not imported & FRONT_DOOR, (module, imported & FRONT_DOOR)
    # a package's __init__ imports its modules, and a module importing ``engine`` (the package) depends on
    # them all: the cycles that matter are between modules, so the packages themselves are left out
    modules = {m: {i for i in deps if i not in PACKAGES} for m, deps in graph.items() if m not in PACKAGES}
    assert find_cycle(modules) is None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (module -> the modules it imports) as the path round it, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])) is not None:
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])) is not None:
            return cycle
    return None


def test_the_checks_can_fail():
    """The measures above find what they are for: a long function, a cycle, an upward import."""
    long = ast.parse("def f():\n    '''doc'''\n" + "    x = 1\n" * 61)
    assert function_lengths(long) == {"f:1": 62}
    assert imports_of(ROOT / "handlers" / "fit.py") >= {"handlers.loaders", "handlers.attach"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
