"""No import cycle between the package's modules, counting imports inside functions.

A cycle hidden in a function body still couples two modules both ways (either can break the
other), and it is how layering erodes unnoticed: the walk reads every ``import`` statement of
every module with :mod:`ast` (no module is imported) and fails on the first strongly connected
set of more than one module, naming it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sept_megatron"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level or in a function)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:  # a name inside a module: its module
                target = target.rpartition(".")[0]
            while target.count(".") >= 1:  # importing a.b.c also runs a.b's __init__
                if target != name:
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_init_edge(importer: str, imported: str) -> bool:
    # ``import a.b.c`` runs a/__init__ and a/b/__init__: an __init__ that only re-exports its
    # own submodules is not a cycle with them.
    return imported.startswith(importer + ".") or importer.startswith(imported + ".")


def test_the_package_has_no_import_cycle():
    graph = {
        name: {m for m in deps if not _is_package_init_edge(name, m)} for name, deps in import_graph().items()
    }
    found = cycles(graph)
    assert not found, "import cycles (counting imports inside functions):\n" + "\n".join(
        " <-> ".join(component) for component in found
    )


def test_the_walk_sees_imports_inside_functions(tmp_path):
    # The checker itself: a cycle made only by a function-level import is found.
    graph = {
        "sept_megatron.a": {"sept_megatron.b"},
        "sept_megatron.b": {"sept_megatron.a"},
        "sept_megatron.c": {"sept_megatron.a"},
    }
    assert cycles(graph) == [["sept_megatron.a", "sept_megatron.b"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from sept_megatron.config import validate\n")
    assert imported_modules(source, "sept_megatron.m", package_modules()) == {"sept_megatron.config"}
