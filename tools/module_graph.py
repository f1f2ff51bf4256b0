"""Print the Rust crate's module dependency graph and fail on an import cycle.

    python tools/module_graph.py [--all] [--src DIR]

Reads every ``src/**/*.rs`` (standard library only), maps each file to its module path
(``src/fast/toeplitz/forward.rs`` is ``fast::toeplitz::forward``), and collects the modules each
one names: ``use crate::...`` and ``use super::...`` statements (braces included) and paths
``crate::a::b`` or ``super::x`` written inline in code. Comments, test modules (``#[cfg(test)]
mod x;`` files and their submodules, inline ``#[cfg(test)] mod tests { ... }``) and
``#[cfg(test)]`` items are left out: tests may import anything.

It prints the graph of the crate's top-level modules (``arch``, ``exact``, ``fast``, ...) and the
graph of the ``fast::`` submodules (``fast::common``, ``fast::toeplitz``, ``fast::lowrank``, ...;
``fast`` itself is ``fast/mod.rs``), with ``--all`` the graph of every module, and exits with
status 1 if either of the first two has a cycle (docs/DESIGN.md §12: imports point down only).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

CFG_TEST = re.compile(r"#\[cfg\(test\)\]")
PATH = re.compile(r"\b(crate|super|self)((?:::\w+)+|::\{)")


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    """The module path of a source file (``()`` for the crate root)."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def strip_comments(text: str) -> str:
    """Drops ``//`` comments (doc comments included) and ``/* */`` blocks; keeps strings."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.split("\n"):
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    return "\n".join(out)


def block_end(text: str, start: int) -> int:
    """Index just past the item starting at ``start``: its ``;`` or its matching ``}``."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == ";" and depth == 0:
            return i + 1
    return len(text)


def strip_test_items(text: str) -> tuple[str, list[str]]:
    """Removes every ``#[cfg(test)]`` item; returns the text and the test ``mod x;`` names."""
    test_mods = []
    while True:
        m = CFG_TEST.search(text)
        if not m:
            return text, test_mods
        rest = text[m.end() :]
        decl = re.match(r"\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", rest)
        if decl:
            test_mods.append(decl.group(1))
        text = text[: m.start()] + text[block_end(text, m.end()) :]


def expand_use(body: str) -> list[str]:
    """``a::{b::c, d}`` -> ``["a::b::c", "a::d"]`` (nested braces; ``self`` kept)."""
    body = re.sub(r"\s+", "", body)
    i = body.find("{")
    if i < 0:
        return [body.split(" as ")[0]]
    prefix, inner = body[:i], body[i + 1 : body.rfind("}")]
    items, depth, cur = [], 0, ""
    for c in inner:
        if c == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += (c == "{") - (c == "}")
        cur += c
    items.append(cur)
    out = []
    for it in items:
        if it:
            out.extend(prefix + sub for sub in expand_use(it))
    return out


def references(text: str, children: set[str]) -> list[str]:
    """Every ``crate::``/``super::``/``self::`` path the (comment- and test-free) code names, and
    the ``use child::...`` of its own submodules (``pub use`` re-exports in ``mod.rs``)."""
    refs = []
    for m in re.finditer(r"\buse\s+([^;]*);", text):
        for path in expand_use(m.group(1)):
            head = path.split("::")[0]
            if head in ("crate", "super", "self"):
                refs.append(path)
            elif head in children:
                refs.append("self::" + path)
    code = re.sub(r"\buse\s+[^;]*;", "", text)
    for m in PATH.finditer(code):
        if m.group(2) != "::{":
            refs.append(m.group(1) + m.group(2))
    return refs


def resolve(ref: str, here: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...]:
    """The deepest known module a path names, seen from module ``here``."""
    parts = ref.split("::")
    if parts[0] == "crate":
        base: list[str] = []
        parts = parts[1:]
    else:
        # `self` is the file's module; each `super` one level up.
        base = list(here)
        while parts and parts[0] in ("super", "self"):
            if parts.pop(0) == "super":
                base = base[:-1]
    path = tuple(base)
    for p in parts:
        if path + (p,) in modules:
            path = path + (p,)
        else:
            break
    return path


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(path: tuple[str, ...]) -> str:
    return "::".join(path) or "crate"


def print_graph(title: str, graph: dict[str, set[str]]) -> None:
    print(title)
    for node in sorted(graph):
        deps = ", ".join(sorted(graph[node])) or "-"
        print(f"  {node:28} -> {deps}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    ap.add_argument("--all", action="store_true", help="also print the graph of every module")
    args = ap.parse_args(argv)
    src = Path(args.src)

    files = sorted(src.rglob("*.rs"))
    texts, test_decls = {}, set()
    for f in files:
        mod = module_of(src, f)
        text, tests = strip_test_items(strip_comments(f.read_text(encoding="utf-8")))
        texts[mod] = text
        test_decls.update(mod + (t,) for t in tests)
    modules = set(texts)

    def is_test(mod: tuple[str, ...]) -> bool:
        return any(mod[:i] in test_decls for i in range(1, len(mod) + 1))

    full: dict[str, set[str]] = defaultdict(set)
    top: dict[str, set[str]] = defaultdict(set)
    fast: dict[str, set[str]] = defaultdict(set)
    for mod, text in texts.items():
        if is_test(mod) or not mod:
            continue
        full[name(mod)]
        top[mod[0]]
        if mod[0] == "fast":
            fast[name(mod[:2])]
        children = {m[-1] for m in modules if m[:-1] == mod and len(m) == len(mod) + 1}
        for ref in references(text, children):
            dep = resolve(ref, mod, modules)
            if not dep or dep == mod or is_test(dep):
                continue
            full[name(mod)].add(name(dep))
            if dep[0] != mod[0]:
                top[mod[0]].add(dep[0])
            if mod[0] == "fast" and dep[0] == "fast" and dep[:2] != mod[:2]:
                fast[name(mod[:2])].add(name(dep[:2]))

    print_graph("top-level modules (tests excluded):", top)
    print_graph("fast:: submodules:", fast)
    if args.all:
        print_graph("every module:", full)
    bad = [("top-level", c) for c in cycles(top)] + [("fast::", c) for c in cycles(fast)]
    for where, comp in bad:
        print(f"CYCLE among {where} modules: {' <-> '.join(comp)}", file=sys.stderr)
    if not bad:
        print("no cycle among the top-level modules or the fast:: submodules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
