"""The package's modules import each other without a loop, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "scratchgpt"


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, anywhere in the file (`__init__` for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y / from . import y
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scratchgpt":
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] if "." in a.name else "__init__" for a in node.names
                         if a.name.split(".")[0] == "scratchgpt")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("__init__")  # __import__('scratchgpt'): the package, by the back door
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop in `graph` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (loop := visit(nxt, path + [nxt])):
                return loop
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (loop := visit(start, [start])):
            return loop
    return None


def test_no_module_of_the_package_imports_itself_back():
    graph = {path.stem: package_imports(path) - {path.stem} for path in PACKAGE.glob("*.py")}
    # The package's __init__ imports its modules; a module that imports the package back closes a loop.
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_sees_a_loop_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    graph = {p.stem: package_imports(p) for p in tmp_path.glob("*.py")}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
