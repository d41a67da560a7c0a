"""The package's layout rules (../shared/STYLE.md), read from the source with ``ast``.

Library modules never import command modules, function-local imports included; no import
cycles, every import edge counted; no function of 120 lines or more; DistillRun stays small.
"""

from __future__ import annotations

import ast
import itertools
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
# Thin command modules. export and report are library modules that also have a main().
COMMANDS = {"train", "compare", "evaluate", "bench", "profile_step", "scan", "analyze", "launch"}
INIT = "__init__"  # `from distill import __version__` imports the package itself
MAX_FUNCTION_LINES = 120  # exclusive
MAX_DISTILL_RUN_LINES = 260


@cache
def trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _target(name: str, modules: set[str]) -> str | None:
    """The distill module a dotted import name refers to: distill.x -> x; distill -> __init__."""
    parts = name.split(".")
    if parts[0] != "distill":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in modules else INIT


@cache
def imports() -> dict[str, dict[str, int]]:
    """module -> {imported distill module: first line}, every import in the file (top level,
    function-local, under TYPE_CHECKING): `import distill.x`, `from distill import x`,
    `from distill.x import y`, and relative forms."""
    modules = set(trees())
    graph: dict[str, dict[str, int]] = {}
    for name, module in trees().items():
        edges: dict[str, int] = {}
        for node in ast.walk(module):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_target(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: inside distill (a flat package)
                    base = "distill" + (f".{base}" if base else "")
                if base == "distill":  # from distill import x: x is a module or a package attribute
                    targets = [alias.name if alias.name in modules else INIT for alias in node.names]
                else:
                    targets = [_target(base, modules)]
            for target in targets:
                if target is not None and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component."""
    return [_cycle_in(graph, set(c), c[0]) for c in _components(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside ``component`` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return [*paths[v], start]
                if w in component and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component has one


def _functions(node: ast.AST, prefix: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every function and method below ``node``."""
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{child.name}"
            if not isinstance(child, ast.ClassDef):
                found.append((name, child.lineno, child.end_lineno - child.lineno + 1))
            found += _functions(child, name)
        else:
            found += _functions(child, prefix)
    return found


# The graph reader itself ------------------------------------------------------------------------


def test_imports_are_read_in_every_form() -> None:
    graph = imports()
    assert set(graph) >= {"config", "trainer", "train", INIT}
    assert "errors" in graph["config"]  # from distill.errors import RecipeError (top level)
    assert "trainer" in graph["train"]  # from distill.trainer import DistillRun (inside main)
    assert not graph[INIT] or set(graph[INIT]) <= set(graph)


def test_cycle_finder() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"f": 1}, "f": {"e": 1}}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


# The rules --------------------------------------------------------------------------------------


def test_library_modules_never_import_command_modules() -> None:
    bad = [
        f"distill/{module}.py:{line} imports the command module distill.{target}"
        for module, edges in sorted(imports().items())
        if module not in COMMANDS
        for target, line in sorted(edges.items())
        if target in COMMANDS
    ]
    assert not bad, "library modules import command modules:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    graph = imports()

    def show(component: list[str]) -> str:
        cycle = _cycle_in(graph, set(component), component[0])
        steps = [f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
        more = f" [all of {', '.join(component)} import each other]" if len(component) > len(cycle) - 1 else ""
        return " -> ".join([*steps, cycle[-1]]) + more

    components = _components(graph)
    assert not components, "import cycles among distill modules:\n  " + "\n  ".join(map(show, components))


def test_no_function_of_120_lines_or_more() -> None:
    lengths = sorted(
        (size, f"{module}{name}", f"distill/{module}.py:{line}")
        for module, tree in trees().items()
        for name, line, size in _functions(tree, "")
    )[::-1]
    offenders = [f"{where} {name} ({size} lines)" for size, name, where in lengths if size >= MAX_FUNCTION_LINES]
    assert not offenders, f"functions of {MAX_FUNCTION_LINES} lines or more:\n  " + "\n  ".join(offenders)


def test_distill_run_stays_small() -> None:
    classes = [
        node for node in ast.walk(trees()["trainer"]) if isinstance(node, ast.ClassDef) and node.name == "DistillRun"
    ]
    assert len(classes) == 1, "distill/trainer.py defines no class DistillRun"
    (run,) = classes
    span = run.end_lineno - run.lineno + 1
    assert span <= MAX_DISTILL_RUN_LINES, (
        f"DistillRun (distill/trainer.py:{run.lineno}) spans {span} lines, over {MAX_DISTILL_RUN_LINES}"
    )
