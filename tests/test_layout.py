"""The package's shape: every module imports, and no two modules import each other in a circle."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relay"
GENERATED = PACKAGE / "_flatgen" / "hikyuu"   # flatc's output: imports only itself


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if GENERATED not in p.parents}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports anywhere (functions and TYPE_CHECKING included).

    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``. A
    submodule's implicit import of its parent package is not an edge: Python does that for
    every package, so only import statements count.
    """
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        edges: Set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for imported in targets:
                target = imported
                while target and target not in modules:   # import a.b.c of a module a.b
                    target = target.rpartition(".")[0]
                if target.startswith("relay") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as a list of modules (first repeated at the end), or []."""
    state: Dict[str, int] = {}   # 1 = on the current path, 2 = done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_no_import_cycles() -> None:
    """No module of the package reaches itself through its imports, lazy ones included."""
    assert [] == find_cycle(import_graph())


def test_cycle_finder_finds_a_planted_cycle() -> None:
    """The finder reports a circle through lazy imports, so the test above can fail."""
    graph = {"relay.a": {"relay.b"}, "relay.b": {"relay.c"}, "relay.c": {"relay.a"},
             "relay.d": set()}
    assert ["relay.a", "relay.b", "relay.c", "relay.a"] == find_cycle(graph)


def test_graph_sees_lazy_imports() -> None:
    """Imports inside functions are edges of the graph (cli -> the Windows service shell)."""
    graph = import_graph()
    assert "relay.ops.service" in graph["relay.cli"]
    assert "relay.sinks" in graph["relay.sinks.snapshot"]


def test_client_imports_only_wire_records_errors() -> None:
    """The subscriber library imports nothing of the relay but relay.wire, .records, .errors."""
    graph = import_graph()
    allowed = {"relay.wire", "relay.records", "relay.errors"}
    outside = {f"{name} -> {dep}" for name, deps in graph.items() if name.startswith("relay.client")
               for dep in deps if not dep.startswith("relay.client") and dep not in allowed}
    assert set() == outside


@pytest.mark.parametrize("name", sorted(n for n in _modules() if not n.endswith("__main__")))
def test_every_module_imports(name: str) -> None:
    """Every module of the package imports on this platform (Windows-only parts lazily)."""
    assert importlib.import_module(name).__name__ == name
