"""The structure budgets of issue 17, measured on the package code (pervade/ and the role packages):
modules over 400 lines, functions over 60, and import cycles between pervade's modules.

    python bench/structure.py            # this checkout
    python bench/structure.py --root DIR # another checkout (an older commit in a git worktree)

Lines are physical lines of the file; a function's lines run from its ``def`` to its last line (a nested
function counts inside its parent and on its own). Imports are read from the source (``import`` and
``from ... import`` anywhere in a module, at its top or inside functions) and mapped to pervade's modules; a
cycle is a set of modules that import each other, directly or through others (a strongly connected
component of more than one module). Imports inside functions are listed apart: they are how a cycle is
usually hidden, and they cost nothing at import time.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

#: Folder -> the package it installs as (pyproject.toml's package-dir): both layouts of the tree are read.
PACKAGES = {"pervade": "pervade", "broker": "pervade.broker", "gpuworker": "pervade.gpuworker",
            "producer": "pervade.producer", "sinks": "pervade.sinks", "jobs": "pervade.jobs"}  # fmt: skip
MODULE_LINES = 400
#: The command line: the top of the import graph, which imports every role by design.
CLI_MODULES = ("pervade.cli", "pervade.commands", "pervade.jobcommands", "pervade.__main__")
FUNCTION_LINES = 60


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package code: its dotted name as installed -> its file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imported_names(tree: ast.Module, name: str, is_package: bool) -> list[tuple[str, bool]]:
    """The modules ``tree`` imports, each with whether the import is at module level."""
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
            found.append((base, id(node) in top_level))
    return found


def import_graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module-level imports and imports inside functions, between pervade's modules."""
    graph: dict[str, set[str]] = {name: set() for name in mods}
    deferred: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        for target, at_top in imported_names(tree, name, path.name == "__init__.py"):
            head = target.split(".")[0]
            if head in PACKAGES and head != "pervade":  # the layout before issue 17: `from broker.x import`
                target = f"pervade.{target}"
            while target and target not in mods:  # `from pervade.x import Name`: the module is pervade.x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                (graph if at_top else deferred)[name].add(target)
    return graph, deferred


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    sys.setrecursionlimit(10_000)
    for node in graph:
        if node not in index:
            visit(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    mods = modules(args.root)
    long_modules, long_functions = [], []
    for name, path in mods.items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MODULE_LINES:
            long_modules.append((lines, name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    long_functions.append((length, f"{name}.{node.name}"))
    graph, deferred = import_graph(mods)
    with_deferred = {name: graph[name] | deferred[name] for name in graph}
    total_lines = sum(path.read_text().count("\n") for path in mods.values())

    print(f"{len(mods)} modules, {total_lines} lines in {args.root}")
    print(f"\nmodules over {MODULE_LINES} lines: {len(long_modules)}")
    for lines, name in sorted(long_modules, reverse=True):
        print(f"  {lines:>5}  {name}")
    print(f"\nfunctions over {FUNCTION_LINES} lines: {len(long_functions)}")
    for lines, name in sorted(long_functions, reverse=True):
        print(f"  {lines:>5}  {name}")
    top_cycles, all_cycles = cycles(graph), cycles(with_deferred)
    print(f"\nimport cycles (module-level imports): {len(top_cycles)}")
    for component in top_cycles:
        print(f"  {' <-> '.join(component)}")
    print(f"import cycles counting imports inside functions: {len(all_cycles)}")
    for component in all_cycles:
        print(f"  {' <-> '.join(component)}")
    shared = "pervade." + "|pervade.".join(("broker", "gpuworker", "producer", "sinks", "jobs"))
    roles = tuple(shared.split("|"))
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in with_deferred.items()
        if name.count(".") == 1 and not name.startswith(roles) and name not in CLI_MODULES
        for target in targets
        if target.startswith(roles)
    )
    print(f"\nshared modules (pervade.*) importing a role package: {len(upward)}")
    for line in upward:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
