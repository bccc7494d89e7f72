"""The package's shape (docs/design.md section 3): no import cycle, at module level or inside
functions; no module imports a higher layer or the package root; no module over 450 lines.

Imports are read with ``ast`` (every Import/ImportFrom node, function bodies included), so the
rules hold for code paths the tests never run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dflow_fast"
#: where each top-level part of the package may sit: a module imports only its own rank or lower
RANKS = {
    "_C": 0, "_version": 0, "ops": 0, "kernels": 0,
    "core": 1,
    "gradients": 2, "optim": 2,
    "solve": 3, "optimize": 3, "graphed": 3, "priors": 3, "reference": 3, "models": 3, "data": 3,
    "metrics": 3,
    "molecules": 3,
    "adapters": 3,
    "tasks": 4,
    "apps": 5, "jobs": 5,
    "__main__": 6,
}
MAX_LINES = 450
#: compiled modules: no source to read, leaves of the graph
EXTENSIONS = {f"{PACKAGE}._C"}


def package_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for dflow_fast/ and kernels/ (installed as dflow_fast.kernels)."""
    files = {}
    for base, prefix in ((root / PACKAGE, PACKAGE), (root / "kernels", f"{PACKAGE}.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([prefix, *parts])] = path
    return files


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def imports_of(name: str, files: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source. ``from P import x`` counts as
    an import of the submodule P.x when there is one, else of P."""
    tree = ast.parse(files[name].read_text(encoding="utf-8"))
    here = name if is_package(name, files) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            known = files.keys() | EXTENSIONS
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Edges between modules of the package (an import of a compiled module such as
    dflow_fast._C is kept as a leaf)."""
    return {name: imports_of(name, files) for name in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def rank(name: str) -> int:
    part = name.split(".")[1]
    return RANKS[part]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, and imports of the package root by anything but the root."""
    bad = []
    for a, targets in graph.items():
        for b in sorted(targets):
            if b == PACKAGE:
                if a != PACKAGE:
                    bad.append(f"{a} imports the package root {PACKAGE} (import the module "
                               f"that defines the name instead)")
            elif a != PACKAGE and rank(b) > rank(a):
                bad.append(f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)})")
    return bad


# ---- the package ---------------------------------------------------------------------------------

FILES = package_files()
GRAPH = import_graph(FILES)


def test_every_top_level_part_has_a_layer():
    parts = {name.split(".")[1] for name in FILES if name != PACKAGE}
    assert parts <= set(RANKS), f"modules without a layer in RANKS: {sorted(parts - set(RANKS))}"


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_no_lower_layer_imports_a_higher_one():
    assert layer_violations(GRAPH) == []


@pytest.mark.parametrize("name", sorted(FILES))
def test_module_size(name):
    n = len(FILES[name].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{FILES[name].relative_to(ROOT)} has {n} lines (> {MAX_LINES})"


# ---- the checker itself, on a package written here -----------------------------------------------

def _fake_package(tmp_path: Path, sources: dict[str, str]) -> dict[str, Path]:
    for rel, text in sources.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "kernels").mkdir(exist_ok=True)
    return package_files(tmp_path)


def test_checker_sees_a_cycle_inside_a_function(tmp_path):
    files = _fake_package(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from . import b\n",
        "core/b.py": "from .a import f\n",
    })
    cycle = find_cycle(import_graph(files))
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.core.a", f"{PACKAGE}.core.b"}


def test_checker_sees_an_upward_import_and_the_root(tmp_path):
    files = _fake_package(tmp_path, {
        "__init__.py": "from .solve import solve\n",
        "solve.py": "def solve():\n    pass\n",
        "core/__init__.py": "",
        "core/plan.py": "from ..solve import solve\nimport dflow_fast\n",
    })
    graph = import_graph(files)
    assert graph[f"{PACKAGE}.core.plan"] == {f"{PACKAGE}.solve", PACKAGE}
    bad = layer_violations(graph)
    assert len(bad) == 2 and "layer 1" in bad[0] + bad[1] and "package root" in bad[0] + bad[1]
