#!/usr/bin/env python3
"""Checks that no two rooms of a crate import each other, directly or round a loop.

usage: scripts/check-rooms.py SRC_DIR...   e.g. scripts/check-rooms.py crates/*/src src

A room is a top-level file or directory under a crate's src (lib.rs and main.rs
excluded). Room A uses room B when a file of A names `crate::B` (in a `use` or
a path) outside comments and outside its `#[cfg(test)] mod tests` tail: tests
and docs may reach anywhere.
Each loop between rooms is printed with its edges and makes the exit status 1;
a loop inside one room (a directory module's own files) is fine.
scripts/test.sh runs it on every crate and the binary.
"""
import os
import re
import sys

TESTS_TAIL = re.compile(r"#\[cfg\(test\)\]\s*mod tests\s*\{")
PATH = re.compile(r"crate::([a-z_0-9]+)")
GROUP = re.compile(r"crate::\{([^}]*)\}")
GROUP_HEAD = re.compile(r"(?:^|,)\s*([a-z_0-9]+)")
# Comments (docs included) may name any room: only code makes an arrow.
COMMENT = re.compile(r"//.*$", re.M)


def rooms_of(root):
    """Room name -> its .rs files."""
    rooms = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(directory, name)
            top = os.path.relpath(path, root).split(os.sep)[0]
            top = top[:-3] if top.endswith(".rs") else top
            if top not in ("lib", "main"):
                rooms.setdefault(top, []).append(path)
    return rooms


def edges_of(rooms):
    """Room -> the other rooms it uses."""
    edges = {room: set() for room in rooms}
    for room, files in rooms.items():
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            tail = TESTS_TAIL.search(text)
            if tail:
                text = text[: tail.start()]
            text = COMMENT.sub("", text)
            used = set(PATH.findall(text))
            for group in GROUP.findall(text):
                used.update(GROUP_HEAD.findall(group))
            edges[room].update(u for u in used if u in rooms and u != room)
    return edges


def loops(edges):
    """Strongly connected components of more than one room (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main(roots):
    if not roots:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    status = 0
    for root in roots:
        edges = edges_of(rooms_of(root))
        components = loops(edges)
        if not components:
            print(f"{root}: no import loop between rooms")
            continue
        status = 1
        for component in components:
            print(f"{root}: loop among {len(component)} rooms: {' '.join(component)}")
            for room in component:
                inside = sorted(b for b in edges[room] if b in component)
                print(f"    {room} -> {', '.join(inside)}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
