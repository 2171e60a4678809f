"""Imports run one way, with no circles: flows -> tasks -> zoo -> merge, evaluation (README, Layout).

Every module of the package is parsed (not imported) and every import counted, at the top of a
file or inside a function: a function-level import that closes a circle hides it, it does not
break it. Importing `a.b.c` also runs the `__init__` of each package on the way that the
importing module is not already inside, so those count too. Not counted: the imports of an
`if __name__ == "__main__":` block, which runs only as a script (`python -m ...`), a module of
its own that uses the file after its package is imported; nothing imports it.

Run: python -m pytest tests/test_layers.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "evaluation", "zoo", "tasks", "flows", "configs")  # each installs as mergeline.<name>

# What each layer may not import. The zoo builds demo models with the merge engine and writes
# lm-eval tasks and data the evaluation reads, so zoo -> merge, evaluation and never back.
FORBIDDEN = {
    "merge": ("evaluation", "zoo", "tasks", "flows"),
    "evaluation": ("zoo", "tasks", "flows"),
    "zoo": ("tasks", "flows"),
    "tasks": ("flows",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["mergeline", *parts])


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, scripts: bool = False) -> list[tuple[str, int]]:
    """(imported name, absolute, line) for every import of a module (of its script block too,
    with `scripts`)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    tree.body = [n for n in tree.body if scripts or not _is_script_block(n)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .gram import y
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base, node.lineno) for a in node.names]
    return found


def _is_script_block(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` at the top level of a module."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def edges() -> dict[str, dict[str, int]]:
    """module -> {mergeline module it runs on import: line of the import}."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for m in MODULES:
        for target, line in imports_of(m):
            if not target.startswith("mergeline."):
                continue
            while target not in MODULES and "." in target:  # a name inside a module
                target = target.rpartition(".")[0]
            if target != m:
                graph[m].setdefault(target, line)
            parts = target.split(".")
            for package in (".".join(parts[:i]) for i in range(2, len(parts))):
                if package in MODULES and m != package and not m.startswith(package + "."):  # its own ran already
                    graph[m].setdefault(package, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a path that closes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(sorted(g), graph) for g in groups]


def _path_through(group: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest circle from the group's first module back to itself, inside the group."""
    start, inside = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def short(module: str) -> str:
    return module.removeprefix("mergeline.")


def test_every_package_folder_is_scanned():
    assert {m.split(".")[1] for m in MODULES} == set(PACKAGES)
    assert len(MODULES) > 50


def test_no_import_circles():
    graph = edges()
    found = cycles(graph)
    shown = ["  " + " -> ".join(f"{short(a)} (line {graph[a][b]})" for a, b in zip(c, c[1:])) + f" -> {short(c[-1])}"
             for c in found]
    assert not found, "import circles (each: a module and the line that imports the next):\n" + "\n".join(shown)


def wrong_way(graph: dict[str, dict[str, int]], layer: str) -> list[str]:
    """Imports from `layer` into a layer it may not import."""
    return [f"{short(m)} imports {short(t)} (line {line})" for m, ts in graph.items()
            if m.split(".")[1] == layer for t, line in ts.items() if t.split(".")[1] in FORBIDDEN[layer]]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_run_one_way(layer):
    wrong = wrong_way(edges(), layer)
    assert not wrong, "\n".join(wrong)


def test_no_old_top_level_names():
    """The folders install under `mergeline`: `import merge.x` would import nothing installed."""
    old = set(PACKAGES) | {"evaluation.zoo"}
    wrong = [f"{short(m)}: line {line} imports {target!r}" for m in MODULES
             for target, line in imports_of(m, scripts=True) if target.split(".")[0] in old]
    tests = [f"{p.relative_to(ROOT)}: line {node.lineno} imports {n!r}" for p in sorted((ROOT / "tests").rglob("*.py"))
             for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
             for n in _absolute_names(node) if n.split(".")[0] in old]
    assert not wrong + tests, "\n".join(wrong + tests)


def _absolute_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_the_checker_sees_a_circle_and_a_wrong_way_import():
    """The checks above can fail: a made-up graph with a circle and an upward import; a script
    block is told from another `if`."""
    graph = {"mergeline.merge.a": {"mergeline.merge.b": 3}, "mergeline.merge.b": {"mergeline.merge.a": 7},
             "mergeline.merge.c": {"mergeline.flows.cli": 1}, "mergeline.flows.cli": {}}
    assert cycles(graph) == [["mergeline.merge.a", "mergeline.merge.b", "mergeline.merge.a"]]
    assert wrong_way(graph, "merge") == ["merge.c imports flows.cli (line 1)"]
    assert wrong_way(graph, "flows") == []
    script, branch = ast.parse('if __name__ == "__main__":\n    import x\nif __name__ == "x":\n    pass\n').body
    assert _is_script_block(script) and not _is_script_block(branch)
