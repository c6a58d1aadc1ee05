"""copyscan: find where a text-to-image model's generations copy its training data.

The installed distribution is this one package: ``copyscan.jobs`` (the ``copyscan`` command, and
``python -m copyscan.jobs.NAME`` for ``ray job submit``), ``copyscan.indexing`` (from LAION shards to a sharded
FAISS index) and ``copyscan.search`` (scans and their results: ``from copyscan.search import results``). The
repository keeps them in its top-level folders ``jobs/``, ``indexing/`` and ``search/``; pyproject.toml's
``package-dir`` installs them under this package (ARCHITECTURE.md, "The packages").

The public API (imported on first use, so ``import copyscan`` loads neither torch nor Ray):

- ``copyscan.index(shards, out, **keys)`` and ``copyscan.scan(index, queries, out, **keys)``: the jobs, with
  the command line's keys (``copyscan.jobs._api``);
- ``copyscan.open_run(url)``: a scan's matches as a pyarrow dataset, or a DuckDB relation with
  ``engine="duckdb"`` (``copyscan.search.results``);
- ``copyscan.Index(url, **keys)``: an index searched in this process with images or vectors, in a loop or as
  a Ray Data ``map_batches`` function (``copyscan.search.local``).
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("copyscan")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

# Imported from a source tree rather than from site-packages (a Ray job's working dir, which Ray puts first on
# sys.path so that the shipped source runs, not the image's install; `python -m` in a checkout): the
# sub-packages are then this folder's siblings. Installed, the parent folder is site-packages, which holds no
# pyproject.toml and no jobs/, indexing/ or search/ package, and this adds nothing.
_root = Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and all(
    (_root / sub / "__init__.py").is_file() for sub in ("jobs", "indexing", "search")
):
    __path__.append(str(_root))
del _root

__all__ = ["Index", "index", "open_run", "scan", "__version__"]
_API = {
    "Index": ("copyscan.search.local", "Index"),
    "index": ("copyscan.jobs._api", "index"),
    "scan": ("copyscan.jobs._api", "scan"),
    "open_run": ("copyscan.search.results.dataset", "open"),
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'copyscan' has no attribute {name!r}")
    from importlib import import_module

    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value
