"""normfold's modules import each other without a cycle, and the fold engine imports at module top.

The import graph is read from the source with ``ast`` (no import runs): an
edge ``a -> b`` for every ``import``/``from ... import`` of a normfold module
in ``a``, at module level or inside a function (an import deferred into a
function still makes a cycle, only a hidden one). A package's own
``__init__`` running first when a submodule is imported is not an edge
(Python allows that by design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "normfold"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The normfold module ``name`` refers to (a name imported from a module resolves to that module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(tree: ast.Module, here: str, is_package: bool, modules: dict[str, Path],
             top_level: bool) -> list[tuple[str, int]]:
    """(imported normfold module, line) for module-level imports (``top_level``) or for the nested ones."""
    out = []
    package = here if is_package else here.rpartition(".")[0]
    nodes = tree.body if top_level else [n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                                                      ast.AsyncFunctionDef))
                                         for n in ast.walk(f)]
    if top_level:  # module-level statements, including those inside try/if blocks
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for n in nodes:
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                anchor = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" for a in n.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != here:
                out.append((target, n.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    """normfold module -> the normfold modules it imports (at module level or in a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = {t for top in (True, False)
                 for t, _ in _imports(tree, name, path.name == "__init__.py", modules, top_level=top)}
        # importing a submodule runs its parent packages' __init__ first: not a cycle
        graph[name] = {t for t in edges if not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_normfold() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


FOLD_ENGINE = ["normfold/graph.py", *sorted(str(p.relative_to(ROOT.parent)) for p in (ROOT / "passes/fold").glob("*.py"))]


@pytest.mark.parametrize("rel", FOLD_ENGINE)
def test_fold_engine_imports_at_module_top(rel: str) -> None:
    modules = _modules()
    path = ROOT.parent / rel
    tree = ast.parse(path.read_text(), str(path))
    nested = _imports(tree, _module_name(path), path.name == "__init__.py", modules, top_level=False)
    assert not nested, f"{rel} imports inside functions: {nested}"


def test_fold_engine_imports_point_one_way() -> None:
    """Nothing in the fold package imports the package's __init__ (the dispatcher) or the old paths."""
    graph = import_graph()
    upward = {"normfold.passes.fold", "normfold.passes.fold_batchnorm", "normfold.passes.fold_exported",
              "normfold.passes.fold_batchnorm_forward", "normfold"}
    for name, edges in graph.items():
        if name.startswith("normfold.passes.fold."):
            assert not edges & upward, f"{name} imports upward: {sorted(edges & upward)}"
