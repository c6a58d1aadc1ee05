"""copyscan: find where a text-to-image model's generations copy its training data.

The installed distribution is this one package: ``copyscan.jobs`` (the ``copyscan`` command, and
``python -m copyscan.jobs.NAME`` for ``ray job submit``), ``copyscan.indexing`` (from LAION shards to a sharded
FAISS index) and ``copyscan.search`` (scans and their results: ``from copyscan.search import results``). The
repository keeps them in its top-level folders ``jobs/``, ``indexing/`` and ``search/``; pyproject.toml's
``package-dir`` installs them under this package (ARCHITECTURE.md, "The packages").
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
