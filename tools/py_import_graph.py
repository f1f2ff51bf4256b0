"""Check that the fastrope package's modules import each other without a cycle.

Reads every ``python/fastrope/**/*.py`` with :mod:`ast` (stdlib only, nothing is imported) and
takes the imports that run when a module loads: module level, class bodies and top-level
``if``/``try`` blocks, not function bodies (a function's import runs after both modules have
loaded, so it cannot meet a half-initialised module).  Edges: ``from . import x``,
``from ._x import y``, ``from .. import``, ``import fastrope``, ``from fastrope.x import y``.
Prints each cycle and exits 1 when there is one; ``--print`` lists the graph.

    python tools/py_import_graph.py [--print] [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "python" / "fastrope"


def module_name(pkg: Path, path: Path) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_time_imports(tree: ast.Module):
    """Import statements that run when the module loads (not inside functions)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        else:
            todo.extend(ast.iter_child_nodes(node))


def edges(pkg: Path) -> dict:
    files = sorted(pkg.rglob("*.py"))
    mods = {module_name(pkg, f): f for f in files}
    top = pkg.name
    graph: dict = {m: set() for m in mods}
    # native extension modules (their stubs name them): leaves of the graph
    for stub in pkg.rglob("*.pyi"):
        graph.setdefault(module_name(pkg, stub), set())

    def add(src: str, target: str) -> None:
        # the longest prefix of target that is one of our modules
        parts = target.split(".")
        while parts:
            name = ".".join(parts)
            if name in graph:
                if name != src:
                    graph[src].add(name)
                return
            parts.pop()

    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node in load_time_imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == top:
                        add(mod, alias.name)
                continue
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                if not node.module or node.module.split(".")[0] != top:
                    continue
                base_name = node.module
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                add(mod, sub if sub in graph else base_name)
    return graph


def cycles(graph: dict) -> list:
    """Every elementary cycle found by a depth-first search (each reported once)."""
    found, seen = [], set()
    state: dict = {}

    def visit(node: str, stack: list) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cyc = stack[stack.index(nxt) :]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    found.append(cyc + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def main(argv: list) -> int:
    show = "--print" in argv
    args = [a for a in argv if a != "--print"]
    pkg = Path(args[0]).resolve() if args else ROOT
    graph = edges(pkg)
    if show:
        for mod in sorted(graph):
            print(f"{mod}: {', '.join(sorted(graph[mod])) or '-'}")
    found = cycles(graph)
    for cyc in found:
        print("import cycle: " + " -> ".join(cyc))
    if found:
        return 1
    print(f"{len(graph)} modules of {pkg.name}, no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
