"""The package's import graph: no module imports one that (directly or through others) imports it back.

Function-level imports count too: a lazy import that hides a cycle still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asvd_passes"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its body (a package's ``__init__`` counts as itself)."""
    name = module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else (node.module or "")
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    # A submodule importing its own parent package (``from .. import kv`` inside kv) is not an edge back.
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def import_cycles() -> list[list[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    cycles, seen = [], set()
    for start in sorted(graph):  # a depth-first search from each module back to itself
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    key = frozenset(trail)
                    if key not in seen:
                        seen.add(key)
                        cycles.append(trail + [start])
                elif nxt not in trail and nxt > start:  # each cycle found once, from its smallest module
                    stack.append((nxt, trail + [nxt]))
    return cycles


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_checker_sees_a_function_level_cycle(tmp_path, monkeypatch):
    package = tmp_path / "asvd_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import f\n")
    (package / "b.py").write_text("def f():\n    from .a import g\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert import_cycles() == [["asvd_passes.a", "asvd_passes.b", "asvd_passes.a"]]
