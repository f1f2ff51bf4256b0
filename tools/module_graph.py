"""The crate's module graph: which module imports which (``use crate::...`` outside tests).

Prints one line per module with the modules it uses, at the level of the crate's top-level
modules and of ``fast::``'s submodules, and exits 1 when either level has a cycle.

    python tools/module_graph.py [--src src]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

USE = re.compile(r"\bcrate::([a-z_]+)(?:::([a-z_]+))?")


def module_of(path: Path, src: Path) -> list[str]:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    return parts


def strip_tests(text: str) -> str:
    """The text before the first ``#[cfg(test)]`` module (tests may import anything)."""
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text)
    return text if m is None else text[: m.start()]


def node(parts: list[str]) -> str:
    if parts[:1] == ["fast"] and len(parts) > 1:
        return "fast::" + parts[1]
    return parts[0] if parts else "lib"


def graph(src: Path) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.rs")):
        parts = module_of(path, src)
        if any("test" in p for p in parts):
            continue
        me = node(parts)
        deps = edges.setdefault(me, set())
        text = strip_tests(path.read_text())
        for line in text.splitlines():
            if line.lstrip().startswith("//"):
                continue
            for top, sub in USE.findall(line):
                other = node([top] + ([sub] if sub else []))
                if other != me and not (other == "fast" and me.startswith("fast::")):
                    deps.add(other)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    args = ap.parse_args()
    edges = graph(Path(args.src))
    for m in sorted(edges):
        print(f"{m:24s} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    found = cycles(edges)
    for c in found:
        print("cycle:", " <-> ".join(c), file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
