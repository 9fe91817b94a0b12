"""The import graph of Python packages, read from their source with `ast` (nothing is imported):
top-level and function-level imports alike, relative ones resolved. tests/test_structure.py keeps
coupled_net's graph a tree of layers with it (SPEC §12)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    source: str        # the importing module
    target: str        # the imported module of the graph (a name inside a module counts as the module)
    line: int
    nested: bool       # inside a function or method, not at the top of the module
    commented: bool    # a comment on its line or the line above says why


def modules(root: Path, packages: list[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` below `root` (a package is its __init__)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _innermost(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.AST, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if known[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module` imports the module
    found = [_innermost(name, known) for name in names]
    return [t for t in dict.fromkeys(found) if t is not None and t != module]


def imports(root: Path, packages: list[str]) -> list[Import]:
    """Every import of a module of `packages` by another, with where it is."""
    known = modules(root, packages)
    out = []
    for module, path in known.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        nested = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            around = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            for target in _targets(module, node, known):
                out.append(Import(module, target, node.lineno, id(node) in nested, "#" in around))
    return out


def graph(edges: list[Import]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in edges:
        out.setdefault(e.source, set()).add(e.target)
        out.setdefault(e.target, set())
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def layers(g: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor in an acyclic graph: 0 for a module that imports none of the graph, else one
    above the highest module it imports."""
    floor: dict[str, int] = {}

    def of(v: str) -> int:
        if v not in floor:
            floor[v] = 1 + max((of(w) for w in g.get(v, ())), default=-1)
        return floor[v]

    for v in g:
        of(v)
    return floor
