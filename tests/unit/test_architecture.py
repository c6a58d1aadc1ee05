"""The architecture the tree shows (ARCHITECTURE.md): no import cycles, library code importable without Ray,
every package and module named in ARCHITECTURE.md, modules of a readable size, and one installed package,
``copyscan``: the folders jobs/, indexing/ and search/ are ``copyscan.jobs``, ``copyscan.indexing`` and
``copyscan.search``, and nothing names them as top-level packages."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "indexing", "search")  # the folders; installed as copyscan.<folder> (pyproject.toml)
TOP = "copyscan"
MAX_LINES = 450
# Where the project's Python lives: the three packages, the top-level package, the tests and the benches.
SOURCES = (*PACKAGES, TOP, "tests", "bench")


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the three packages and of ``copyscan/`` itself: installed dotted name
    (``search/ann/topk.py`` is ``copyscan.search.ann.topk``) -> file (a package is its ``__init__``)."""
    out = {}
    for folder in (TOP, *PACKAGES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join(parts if folder == TOP else (TOP, *parts))] = path
    return out


def _layer(name: str) -> str:
    """The package a module belongs to: ``copyscan.search.ann.topk`` -> ``search``; ``copyscan`` for the
    modules of ``copyscan/`` itself."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else TOP


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
            top, target_top = _layer(name), _layer(target)
            if (top == "indexing" and target_top != "indexing") or (top == "search" and target_top == "jobs"):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_library_imports_without_ray():
    """Every non-Ray module of indexing/ and search/ imports in a fresh interpreter without loading Ray."""
    names = [
        name
        for name, path in _modules().items()
        if _layer(name) in ("indexing", "search") and not path.stem.endswith("_ray")
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
    full = r"(?:copyscan|jobs|indexing|search)/(?:[\w/]*?(?:\.py|/))?"
    named = set(re.findall(rf"`({full})`", text))
    for item in re.split(r"\n\s*- ", text):
        package = re.match(r"\*{0,2}`((?:copyscan|jobs|indexing|search)/[\w/]*/)`", item.strip())
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


@pytest.mark.parametrize("top", (TOP, *PACKAGES))
def test_every_folder_is_a_package(top):
    folders = [p for p in (ROOT / top).rglob("*") if p.is_dir() and p.name != "__pycache__"]
    assert [str(p) for p in folders if not (p / "__init__.py").exists()] == []


def _python_files() -> list[pathlib.Path]:
    return sorted(p for folder in SOURCES for p in (ROOT / folder).rglob("*.py"))


def test_nothing_imports_a_bare_top_level_package():
    """Every import names ``copyscan.<package>``: importing ``search.x`` next to ``copyscan.search.x`` would
    load the module twice (two CopyscanError classes, one of them never caught), and the installed
    distribution has no top-level ``jobs``, ``indexing`` or ``search``. Strings that name a module count too
    (``"module:Class"`` of a job's config, ``python -m`` arguments, ``importlib.import_module`` names),
    ``f"jobs.{name}"`` included."""
    children = {p.split(".")[2] for p in _modules() if p.count(".") >= 2 and _layer(p) != TOP}
    bare = re.compile(rf"(?<![\w./\-$])(?:{'|'.join(PACKAGES)})\.(?:({'|'.join(sorted(children))})\b|$)")
    wrong = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                targets = []
            wrong += [f"{rel}:{node.lineno}: import {t}" for t in targets if t.split(".")[0] in PACKAGES]
            if isinstance(node, ast.JoinedStr):  # f"jobs.{name}": the literal part ends at the package
                literals = [v.value for v in node.values if isinstance(v, ast.Constant)]
                wrong += [f"{rel}:{node.lineno}: {s!r}" for s in literals if bare.search(s.rstrip())]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = [m.group(0) for m in bare.finditer(node.value) if m.group(1)]
                wrong += [f"{rel}:{node.lineno}: {s!r}" for s in found]
    assert wrong == []


def test_entrypoints_and_docs_name_the_installed_modules():
    """The Makefile, CI, container, cluster and Kubernetes files and the docs run ``python -m
    copyscan.jobs.X`` and import ``copyscan.…``, never a bare ``jobs``/``indexing``/``search``."""
    files = [
        ROOT / "Makefile",
        ROOT / ".ci" / "run",
        ROOT / "infra" / "Dockerfile",
        ROOT / "ray_cluster.yaml",
    ]
    files += (
        sorted((ROOT / "infra").rglob("*.yaml")) + sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("docs/*.md"))
    )
    files += sorted((ROOT / "infra").glob("*.md"))
    packages = "|".join(PACKAGES)
    bare = re.compile(
        rf"python[\d.]* -m (?:{packages})\b|\bfrom (?:{packages})(?:\.\w+)* import |\bimport (?:{packages})\b"
    )
    wrong = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert wrong == []


def test_pyproject_installs_every_package_under_copyscan():
    """pyproject.toml lists every package of the tree as ``copyscan.<folder path>`` (a sub-package it missed
    would work in an editable install and be absent from the wheel) and maps the folders under
    ``copyscan``."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    tree = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert sorted(setuptools["packages"]) == sorted(tree)
    assert setuptools["package-dir"] == {TOP: TOP, **{f"{TOP}.{p}": p for p in PACKAGES}}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"copyscan": "copyscan.jobs.cli:main"}


def test_decode_tasks_import_no_torch():
    """The decode task's module (and the preprocessing it runs) loads without torch: a fresh CPU worker is
    ready for a job's first decode task in a fraction of a second instead of the seconds torch takes."""
    code = (
        "import sys\n"
        "import copyscan.indexing.embed.decode_ray, copyscan.indexing.models.preprocess\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
