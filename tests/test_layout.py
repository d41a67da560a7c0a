"""The package's layout rules, read from the source with ``ast``.

distill/ is a set of subpackages with one import direction (a module imports its own folder and
the layers below it, never one above), thin command modules at the top that nothing imports, no
import cycles between modules, and limits that keep each room small: modules of at most 500
lines, functions of at most 80 lines and 8 parameters (beyond that, a typed options object).
Every import is counted: top level, function-local and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import itertools
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
# Thin command modules at the top of the package: parse arguments, call the library, print.
COMMANDS = {
    "train", "compare", "report", "export", "evaluate", "analyze", "bench", "profile_step", "scan", "launch",
    "recipe_doc", "shard", "teachers", "__main__",
}  # fmt: skip
# Layers from the top down; a module may import modules of its own layer's folders only when they
# share the folder, and any module of a lower layer. "base" holds distill/errors.py and the
# package itself; "entrypoint" is the commands' shared error handling, just below them.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("commands",),
    ("entrypoint",),
    ("study",),
    ("analysis", "perf"),
    ("training",),
    ("exports",),
    ("data",),
    ("models",),
    ("run",),
    ("recipe",),
    ("base",),
)
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8  # self/cls not counted
MAX_DISTILL_RUN_LINES = 260


def module_name(path: Path) -> str:
    """distill/training/trainer.py -> training.trainer; distill/__init__.py -> __init__."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def folder_of(module: str) -> str:
    """The layer folder a module belongs to."""
    if "." in module or module in RANK:  # a subpackage module, or a subpackage's __init__
        return module.split(".")[0]
    if module in COMMANDS:
        return "commands"
    if module == "entrypoint":
        return "entrypoint"
    return "base"  # errors, __init__


@cache
def trees() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(dotted: str, modules: set[str]) -> str | None:
    """The distill module a dotted import name refers to (the longest known prefix)."""
    parts = dotted.split(".")
    if parts[0] != "distill":
        return None
    for end in range(len(parts), 1, -1):
        name = ".".join(parts[1:end])
        if name in modules:
            return name
    return "__init__"


def _package_of(module: str) -> str:
    """The dotted package a module lives in (for relative imports)."""
    is_package = sources()[module].name == "__init__.py"
    parts = module.split(".") if is_package and module != "__init__" else module.split(".")[:-1]
    return ".".join(["distill", *parts])


@cache
def imports() -> dict[str, dict[str, int]]:
    """module -> {imported distill module: first line}: `import distill.x.y`, `from distill.x
    import y` (y a module or a name), `from distill import x`, relative forms."""
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
                if node.level:
                    package = _package_of(name).split(".")
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, base] if base else package)
                targets = [_target(f"{base}.{alias.name}", modules) for alias in node.names]
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


def _functions(node: ast.AST, prefix: str) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method below ``node``."""
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{child.name}"
            if not isinstance(child, ast.ClassDef):
                found.append((name, child))
            found += _functions(child, name)
        else:
            found += _functions(child, prefix)
    return found


def _where(module: str, line: int) -> str:
    return f"{sources()[module].relative_to(PACKAGE.parent)}:{line}"


# The graph reader itself ------------------------------------------------------------------------


def test_imports_are_read_in_every_form() -> None:
    graph = imports()
    assert {"recipe.schema", "training.trainer", "train", "__init__", "errors"} <= set(graph)
    assert "errors" in graph["recipe.schema"]  # from distill.errors import RecipeError (top level)
    assert "training.trainer" in graph["train"]  # imported inside main
    assert folder_of("training.trainer") == "training" and folder_of("train") == "commands"
    assert folder_of("errors") == "base" and folder_of("data") == "data"


def test_cycle_finder() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"f": 1}, "f": {"e": 1}}
    assert [_cycle_in(graph, set(c), c[0]) for c in _components(graph)] == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _components({"a": {"b": 1}, "b": {}}) == []


# The rules --------------------------------------------------------------------------------------


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= set(RANK), f"subpackages without a layer in LAYERS: {sorted(folders - set(RANK))}"
    tops = {p.stem for p in PACKAGE.glob("*.py")}
    assert tops <= COMMANDS | {"__init__", "errors", "entrypoint"}, (
        f"top-level modules that are not commands: {sorted(tops - COMMANDS - {'__init__', 'errors', 'entrypoint'})}; "
        "library code lives in a subpackage"
    )


def test_imports_go_down_the_layers() -> None:
    bad = []
    for module, edges in sorted(imports().items()):
        here = folder_of(module)
        for target, line in sorted(edges.items()):
            there = folder_of(target)
            if there == "commands":
                bad.append(f"{_where(module, line)} imports the command module distill.{target}")
            elif here != there and RANK[there] <= RANK[here]:
                bad.append(f"{_where(module, line)} ({here}) imports distill.{target} ({there}), a layer not below")
    assert not bad, (
        "imports against the direction " + " -> ".join("/".join(f) for f in LAYERS) + ":\n  " + "\n  ".join(bad)
    )


def test_no_import_cycles() -> None:
    graph = imports()

    def show(component: list[str]) -> str:
        cycle = _cycle_in(graph, set(component), component[0])
        steps = [f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(cycle)]
        return " -> ".join([*steps, cycle[-1]])

    components = _components(graph)
    assert not components, "import cycles among distill modules:\n  " + "\n  ".join(map(show, components))


def test_modules_stay_small() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in sources().items()}
    over = [
        f"{sources()[m].relative_to(PACKAGE.parent)} ({n} lines)"
        for m, n in sorted(sizes.items())
        if n > MAX_MODULE_LINES
    ]
    assert not over, f"modules over {MAX_MODULE_LINES} lines:\n  " + "\n  ".join(over)


def test_functions_stay_small() -> None:
    over = []
    for module, tree in trees().items():
        for name, fn in _functions(tree, ""):
            size = fn.end_lineno - fn.lineno + 1
            args = fn.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len([a for a in params if a.arg not in ("self", "cls")])
            if size > MAX_FUNCTION_LINES:
                over.append(f"{_where(module, fn.lineno)} {module}{name}: {size} lines")
            if count > MAX_PARAMETERS:
                over.append(f"{_where(module, fn.lineno)} {module}{name}: {count} parameters")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines or {MAX_PARAMETERS} parameters:\n  " + "\n  ".join(
        sorted(over)
    )


def test_distill_run_stays_small() -> None:
    classes = [
        node
        for node in ast.walk(trees()["training.trainer"])
        if isinstance(node, ast.ClassDef) and node.name == "DistillRun"
    ]
    assert len(classes) == 1, "distill/training/trainer.py defines no class DistillRun"
    (run,) = classes
    span = run.end_lineno - run.lineno + 1
    assert span <= MAX_DISTILL_RUN_LINES, (
        f"DistillRun (distill/training/trainer.py:{run.lineno}) spans {span} lines, over {MAX_DISTILL_RUN_LINES}"
    )
