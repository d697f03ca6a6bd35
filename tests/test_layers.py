"""The layers of dsno depend one way: no import cycle between its modules, the library never imports
the run config, and an import inside a function only defers a heavy optional dependency (and says so)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dsno"
# the composition layer and the entry points: they may import the run config (dsno.config)
COMPOSERS = ("dsno.config", "dsno.cli", "dsno.builders", "dsno.loggers", "dsno.stages", "dsno.search.cli",
             "dsno.search.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    """The dsno modules an import statement loads (a `from X import name` counts X.name when it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("dsno.")]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dsno"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return subs or ([node.module] if node.module != "dsno" else [])
    return []


def module_level_graph() -> dict[str, set[str]]:
    """module -> the dsno modules it imports when it is imported (its module-level statements)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            deps.update(m for m in imported(node) if m in MODULES and m != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import statement inside a function of `path`."""
    source = path.read_text()
    lines = source.splitlines()
    found: list[tuple[int, str]] = []

    class Visitor(ast.NodeVisitor):
        depth = 0

        def visit_FunctionDef(self, node: ast.AST) -> None:
            self.depth += 1
            self.generic_visit(node)
            self.depth -= 1

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node: ast.AST) -> None:
            if self.depth:
                found.append((node.lineno, lines[node.lineno - 1].strip()))

        visit_ImportFrom = visit_Import

    Visitor().visit(ast.parse(source))
    return found


def test_the_graph_sees_imports():
    """The checker itself: it finds edges it must (config -> teachers' config; a planted cycle is one)."""
    graph = module_level_graph()
    assert "dsno.teachers.config" in graph["dsno.config"]
    assert "dsno.checks" in graph["dsno.teachers.config"]
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(module_level_graph()) == []


def test_the_library_never_imports_the_run_config():
    graph = module_level_graph()
    offenders = sorted(m for m, deps in graph.items() if "dsno.config" in deps
                       and not any(m == c or m.startswith(c + ".") for c in COMPOSERS))
    assert offenders == []
    inside = sorted(f"{module_name(p)}:{line}" for p in MODULES.values() for line, text in function_imports(p)
                    if "dsno.config" in text and not any(module_name(p).startswith(c) for c in COMPOSERS))
    assert inside == []


def test_function_imports_only_defer_heavy_dependencies():
    """An import inside a function is a deferral of a heavy optional dependency and carries a comment
    saying so; every other import is at module level."""
    bare = [f"{module_name(p)}:{line}: {text}" for p in MODULES.values() for line, text in function_imports(p)
            if "#" not in text]
    assert bare == []


@pytest.mark.parametrize("module", ["dsno.config", "dsno.teachers.config", "dsno.search.config", "dsno.checks",
                                    "dsno.teachers.unet", "dsno.search.loop", "dsno.stages.pipeline"])
def test_each_layer_imports_on_its_own(module):
    """Imported first, in a fresh interpreter, each module loads (no partially initialised module)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
