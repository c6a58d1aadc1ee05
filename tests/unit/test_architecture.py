"""The architecture the tree shows (ARCHITECTURE.md): no import cycles, library code importable without Ray,
every package and module named in ARCHITECTURE.md, and modules of a readable size."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "indexing", "search")
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the three packages: dotted name -> file (a package is its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imported(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (top level, inside functions, and under
    TYPE_CHECKING: a cycle is a cycle wherever the import sits). ``from pkg import mod`` names ``pkg.mod``.
    Importing ``a.b.c`` also runs the ``__init__`` of the packages ``a.b`` and ``a`` that ``name`` is not
    inside of already (a package whose ``__init__`` imports a module of its own is part of the graph)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target not in modules:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                loaded = ".".join(parts[:i])
                if loaded in modules and loaded != name and not name.startswith(loaded + "."):
                    found.add(loaded)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_library_does_not_import_upwards():
    """indexing/ never imports search/ or jobs/; search/ never imports jobs/ (the demo corpus is jobs/')."""
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imported(name, path, modules):
            top, target_top = name.split(".")[0], target.split(".")[0]
            if (top == "indexing" and target_top != "indexing") or (top == "search" and target_top == "jobs"):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_library_imports_without_ray():
    """Every non-Ray module of indexing/ and search/ imports in a fresh interpreter without loading Ray."""
    names = [
        name
        for name, path in _modules().items()
        if name.split(".")[0] in ("indexing", "search") and not path.stem.endswith("_ray")
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'ray' not in sys.modules, name\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_modules_are_readable_sizes():
    long = {
        name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _named_in_architecture_md(text: str) -> set[str]:
    """Paths ARCHITECTURE.md names in backticks: full ones (`search/ann/`, `search/scan.py`), and bare module
    names (`searcher.py`) in a list item that first names its package (`- `search/ann/`: ... `searcher.py` ...`)."""
    full = r"(?:jobs|indexing|search)/(?:[\w/]*?(?:\.py|/))?"
    named = set(re.findall(rf"`({full})`", text))
    for item in re.split(r"\n\s*- ", text):
        package = re.match(r"\*{0,2}`((?:jobs|indexing|search)/[\w/]*/)`", item.strip())
        if package:
            named |= {package.group(1) + name for name in re.findall(r"`(\w+\.py)`", item)}
    return named


def test_architecture_md_names_the_tree():
    """Every package and module of the tree is named in ARCHITECTURE.md, and everything it names exists."""
    named = _named_in_architecture_md((ROOT / "ARCHITECTURE.md").read_text())
    tree = set()
    for path in _modules().values():
        rel = path.relative_to(ROOT).as_posix()
        tree.add(rel.removesuffix("__init__.py") if path.name == "__init__.py" else rel)
    assert sorted(named - tree) == [], "ARCHITECTURE.md names what the tree does not hold"
    assert sorted(tree - named) == [], "packages and modules ARCHITECTURE.md does not name"


@pytest.mark.parametrize("top", PACKAGES)
def test_every_folder_is_a_package(top):
    folders = [p for p in (ROOT / top).rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert [str(p) for p in folders if not (p / "__init__.py").exists()] == []
