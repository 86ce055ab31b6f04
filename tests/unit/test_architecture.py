"""Architecture rules over `pipeline/`, checked from the ast: size, layering, imports, cycles.

Rules (each failure names file, line and function):
- length: no function or method over 60 lines, counted from its `def` line to the last line of
  its body (decorators excluded; a nested function counts inside its parent too).
- ctx: no parameter named `ctx` in any function under `pipeline/upgrade/` (vacuous until the
  package exists).
- planner: no `ray` or `rich` import, module-level or inside functions, in the planner
  (`pipeline/upgrade/plan.py`, and `pipeline/plan/` while it exists).
- bench: no import of `pipeline.bench` from a module outside `pipeline/bench/`.
- mlflow: `mlflow` imported only under `pipeline/tracking/`.
- cycles: no cycle in the graph of module-level imports among `pipeline` modules (imports inside
  functions and under `if TYPE_CHECKING:` are not edges).
- toplevel: every import sits at module level, except one whose own line or the comment directly
  above it contains "start-up" (a measured start-up cost); consecutive deferred imports share
  the comment above the first of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
MAX_FUNCTION_LINES = 60
START_UP_MARK = "start-up"


@dataclass(frozen=True)
class Module:
    """One parsed module of `pipeline`: its dotted name, repo-relative path, source and ast."""

    name: str
    path: str
    lines: tuple[str, ...]
    tree: ast.Module


@dataclass(frozen=True)
class Import:
    """One import statement: the `pipeline` modules (or external roots) it names and where."""

    targets: tuple[str, ...]
    line: int
    function: str
    top_level: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> tuple[Module, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        found.append(
            Module(
                name=_module_name(path),
                path=path.relative_to(ROOT).as_posix(),
                lines=tuple(source.splitlines()),
                tree=ast.parse(source, filename=str(path)),
            )
        )
    return tuple(found)


@cache
def module_names() -> frozenset[str]:
    return frozenset(m.name for m in modules())


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_package = module.path.endswith("__init__.py")
    base = module.name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: Module, node: ast.Import | ast.ImportFrom) -> tuple[str, ...]:
    """Modules an import names; `from pkg import sub` names `pkg.sub` when that is a module."""
    if isinstance(node, ast.Import):
        return tuple(alias.name for alias in node.names)
    source = _resolve_from(module, node)
    names = module_names()
    subs = tuple(f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in names)
    plain = any(f"{source}.{a.name}" not in names for a in node.names)
    return subs + ((source,) if plain or not subs else ())


class _ImportCollector(ast.NodeVisitor):
    """Every import of a module with the function it sits in ('<module>' outside functions)."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.names: list[str] = []  # enclosing classes and functions, for the qualified name
        self.in_function = 0
        self.type_checking = 0
        self.found: list[Import] = []

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.names.append(node.name)
        self.in_function += 1
        self.generic_visit(node)
        self.in_function -= 1
        self.names.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.names.append(node.name)
        self.generic_visit(node)
        self.names.pop()

    def visit_If(self, node: ast.If) -> None:
        guarded = _is_type_checking(node)
        self.type_checking += guarded
        self.generic_visit(node)
        self.type_checking -= guarded

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append(
            Import(
                targets=_targets(self.module, node),
                line=node.lineno,
                function=".".join(self.names) if self.in_function else "<module>",
                top_level=not self.in_function and not self.type_checking,
            )
        )

    visit_Import = visit_ImportFrom = _import


@cache
def imports(module: Module) -> tuple[Import, ...]:
    collector = _ImportCollector(module)
    collector.visit(module.tree)
    return tuple(collector.found)


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) for every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _names(targets: tuple[str, ...], root: str) -> bool:
    return any(t == root or t.startswith(root + ".") for t in targets)


def _report(failures: list[str], rule: str) -> None:
    if failures:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(failures), pytrace=False)


def test_no_function_over_60_lines() -> None:
    failures = []
    for module in modules():
        for name, node in _functions(module.tree):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                failures.append(f"{module.path}:{node.lineno} {name}: {length} lines")
    _report(failures, f"functions over {MAX_FUNCTION_LINES} lines (def line to end of body)")


def test_no_ctx_parameter_in_upgrade_package() -> None:
    failures = []
    for module in modules():
        if not module.path.startswith("pipeline/upgrade/"):
            continue
        for name, node in _functions(module.tree):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            if any(a is not None and a.arg == "ctx" for a in every):
                failures.append(f"{module.path}:{node.lineno} {name}: takes `ctx`")
    _report(failures, "functions under pipeline/upgrade/ take explicit inputs, never `ctx`")


def _is_planner(path: str) -> bool:
    return path == "pipeline/upgrade/plan.py" or path.startswith("pipeline/plan/")


def _import_failures(applies, forbidden: tuple[str, ...]) -> list[str]:
    failures = []
    for module in modules():
        if not applies(module.path):
            continue
        for imp in imports(module):
            bad = [root for root in forbidden if _names(imp.targets, root)]
            if bad:
                failures.append(f"{module.path}:{imp.line} {imp.function}: imports {bad[0]}")
    return failures


def test_planner_imports_neither_ray_nor_rich() -> None:
    failures = _import_failures(_is_planner, ("ray", "rich"))
    _report(failures, "the planner is pure: no ray, no rich (display lives at the edge)")


def test_production_code_does_not_import_bench() -> None:
    failures = _import_failures(lambda p: not p.startswith("pipeline/bench/"), ("pipeline.bench",))
    _report(failures, "bench/ imports production code, never the reverse")


def test_mlflow_imported_only_in_tracking() -> None:
    failures = _import_failures(lambda p: not p.startswith("pipeline/tracking/"), ("mlflow",))
    _report(failures, "mlflow is imported only under pipeline/tracking/")


def _marked_start_up(module: Module, line: int) -> bool:
    """A "start-up" comment on the import's line, or in the comment block directly above it
    (climbing over the imports just above, which share that comment)."""
    own = module.lines[line - 1]
    if "#" in own and START_UP_MARK in own.split("#", 1)[1]:
        return True
    for above in reversed(module.lines[: line - 1]):
        text = above.strip()
        if text.startswith("#"):
            if START_UP_MARK in text:
                return True
        elif not text.startswith(("import ", "from ")):
            return False
    return False


def test_imports_sit_at_module_level() -> None:
    failures = []
    for module in modules():
        for imp in imports(module):
            if imp.function != "<module>" and not _marked_start_up(module, imp.line):
                failures.append(f"{module.path}:{imp.line} {imp.function}: function-level import")
    _report(failures, 'imports at the top (a deferred one needs a "start-up" comment above it)')


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported pipeline module: line}, module-level runtime imports only."""
    by_name = {m.name: m for m in modules()}
    graph: dict[str, dict[str, int]] = {}
    for name, module in by_name.items():
        edges: dict[str, int] = {}
        for imp in imports(module):
            for target in imp.targets:
                if imp.top_level and target in by_name and target != name:
                    edges.setdefault(target, imp.line)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as a closed path of module names, or None (iterative DFS, colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        colour[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycles() -> None:
    graph = _import_graph()
    cycle = _find_cycle(graph)
    if cycle is None:
        return
    paths = {m.name: m.path for m in modules()}
    hops = [f"{paths[a]}:{graph[a][b]} <module>: imports {b}" for a, b in pairwise(cycle)]
    _report(hops, "import cycle among pipeline modules (module-level imports)")


def test_cycle_finder_finds_a_closed_path() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": 1}, "b": {}}) is None
