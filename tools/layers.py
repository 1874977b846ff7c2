#!/usr/bin/env python3
"""Module layering check (docs/architecture.md): lists the import edges between cellgate's
top-level modules (and between the HTTP handler files), then fails on any cycle or on an edge
that goes up a floor. Reads the source as text; `crate::x` paths in comments do not count.

Usage: python3 tools/layers.py [--edges]    (exit 1 on a violation)
"""
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"

# Floors, lowest first. A module may import its own floor's peers (without cycles) and lower floors.
FLOORS = [
    ["ids", "kmerge", "geo", "telemetry", "config", "auth", "tasks", "synth", "sqlclass", "secrets"],
    ["shardmap"],
    ["routing", "locate", "shardmap::diff"],
    ["backend"],
    ["error", "state", "cache"],
    ["reload", "fleet", "etcd", "migrate", "listen_tls", "credentials"],
    ["app"],
    ["dataplane"],
    ["http", "demo"],
    ["server", "cli"],
]
FLOOR = {m: i for i, f in enumerate(FLOORS) for m in f}
# Handler files of the HTTP floor must not import each other (shared parsing lives in parse.rs,
# shared rendering in respond.rs).
HANDLERS = {"api", "docs", "admin"}


# Sub-modules that sit on another floor than their parent.
SPLIT = {("shardmap", "diff"): "shardmap::diff"}


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    top = rel.parts[0].removesuffix(".rs")
    if len(rel.parts) > 1:
        return SPLIT.get((top, rel.parts[1].removesuffix(".rs")), top)
    return top


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def edges():
    out = set()
    for p in SRC.rglob("*.rs"):
        if p.name in ("lib.rs", "main.rs") and p.parent == SRC:
            continue
        m = module_of(p)
        text = strip_comments(p.read_text())
        for dep, sub in re.findall(r"\bcrate::([a-z_]+)(?:::([a-z_]+))?", text):
            dep = SPLIT.get((dep, sub), dep)
            if dep != m:
                out.add((m, dep))
        # `use super::x` inside src/http/<handler>.rs
        if p.parent.name == "http" and p.stem in HANDLERS:
            for dep in re.findall(r"\bsuper::([a-z_]+)", text):
                if dep in HANDLERS and dep != p.stem:
                    out.add((f"http::{p.stem}", f"http::{dep}"))
            for dep in re.findall(r"\bcrate::http::([a-z_]+)", text):
                if dep in HANDLERS and dep != p.stem:
                    out.add((f"http::{p.stem}", f"http::{dep}"))
    return sorted(out)


def cycles(es):
    graph = {}
    for a, b in es:
        graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return found


def main():
    es = edges()
    if "--edges" in sys.argv:
        for a, b in es:
            print(f"{a} -> {b}")
    problems = []
    for a, b in es:
        if a.startswith("http::"):
            problems.append(f"handler {a} imports handler {b}")
            continue
        fa, fb = FLOOR.get(a), FLOOR.get(b)
        if fa is None or fb is None:
            problems.append(f"{a} -> {b}: module not placed on a floor in tools/layers.py")
        elif fb > fa:
            problems.append(f"{a} (floor {fa}) imports {b} (floor {fb}): an edge up a floor")
    for c in cycles(es):
        problems.append("import cycle: " + " -> ".join(c))
    for p in problems:
        print("layers:", p)
    print(f"layers: {len(es)} import edges, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
