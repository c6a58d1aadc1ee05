"""The Python API's jobs: ``copyscan.index(...)`` and ``copyscan.scan(...)`` run ``copyscan index`` and
``copyscan scan`` from Python, with the same keys and the same checks as the command line, on the Ray
cluster at ``ray_address`` / $RAY_ADDRESS (else a local one), or the one this process already joined."""

from __future__ import annotations

from typing import Any

from copyscan.jobs._runtime import init_ray


def index(shards: str, out: str, *, ray_address: str | None = None, **keys: Any) -> dict[str, Any]:
    """``copyscan index --shards SHARDS --out OUT key=value ...``: builds (or resumes) the index; returns
    its manifest."""
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve

    cfg = resolve(IndexConfig, {"shards": shards, "out": out, **keys})
    init_ray(ray_address)
    return run_index(cfg)


def scan(
    index: str, queries: str, out: str, *, ray_address: str | None = None, **keys: Any
) -> dict[str, Any]:
    """``copyscan scan --index INDEX --queries QUERIES --out OUT key=value ...``: scans (or resumes); returns
    the run's summary. Its matches: ``copyscan.open_run(out)``."""
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    cfg = resolve(ScanConfig, {"index": index, "queries": queries, "out": out, **keys})
    init_ray(ray_address)
    return run_scan(cfg)
