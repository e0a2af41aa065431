"""The shape of the package, read from its source with ast: the nouns live in lookalike.core, which imports nothing else
of lookalike, and the top-level packages and modules import each other without a cycle."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import lookalike

SRC = Path(lookalike.__file__).parent
UNITS = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}


def type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under `if TYPE_CHECKING:`: annotations, never run, so no import-time dependency."""
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    return {id(m) for g in guarded for stmt in g.body for m in ast.walk(stmt)}


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Every lookalike module a file imports (module level or inside functions), with its line number."""
    tree = ast.parse(path.read_text())
    skip = type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)]
            if node.module == "lookalike":  # from lookalike import search: the submodule, when it is one
                found += [(f"lookalike.{a.name}", node.lineno) for a in node.names if a.name in UNITS]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m.split(".")[0] == "lookalike"]


def unit_of(module: str) -> str | None:
    """The top-level package or module of a dotted lookalike module name (None for `lookalike` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in UNITS else None


def unit_graph() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: where (file:line)}, over every file but the lazy public face lookalike/__init__.py."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):
            continue
        unit = rel.parts[0].removesuffix(".py")
        for module, line in imported_modules(path):
            target = unit_of(module)
            if target is not None and target != unit:
                graph.setdefault(unit, {}).setdefault(target, f"{rel}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as the list of its units (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_core_imports_only_core():
    outside = {
        f"core/{path.relative_to(SRC / 'core')}:{line} imports {module}"
        for path in (SRC / "core").rglob("*.py")
        for module, line in imported_modules(path)
        if unit_of(module) != "core"
    }
    assert not outside, sorted(outside)


def test_no_import_cycle_between_top_level_units():
    graph = unit_graph()
    cycle = find_cycle(graph)
    where = [graph[a][b] for a, b in itertools.pairwise(cycle)] if cycle else []
    assert cycle is None, f"import cycle {' -> '.join(cycle)} ({', '.join(where)})"
    assert "metrics" in graph["search"] and "search" not in graph.get("metrics", {})  # the cycle the issue named


def test_the_checks_see_a_cycle_and_a_core_import(tmp_path):
    """The walkers themselves: a cycle through a function-level import is found, a TYPE_CHECKING import is not one."""
    assert find_cycle({"a": {"b": "a:1"}, "b": {"c": "b:1"}, "c": {"a": "c:1"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "a:1"}, "b": {}}) is None
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lookalike.search import search\n"
        "def f():\n    from lookalike.metrics import compute_metrics\nfrom lookalike import viz, __version__\n"
    )
    assert sorted(imported_modules(module)) == [("lookalike", 6), ("lookalike.metrics", 5), ("lookalike.viz", 6)]


def frame_reads(path: Path) -> list[int]:
    """Lines where a file reads an attribute named `frame` (a table's rows: core's own)."""
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "frame"]


def test_no_module_outside_core_reads_a_tables_frame():
    reads = [
        f"{path.relative_to(SRC)}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        if path.relative_to(SRC).parts[0] != "core"
        for line in frame_reads(path)
    ]
    assert not reads, f"read the table through its methods (lookalike.core.table), not .frame: {', '.join(reads)}"


def test_frame_reads_are_seen(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('labels = table.frame.set_index("path").loc[ids, "label"]\nx = DatasetTable(frame, root)\n')
    assert frame_reads(module) == [1]
