"""The end of a scan run: ``OUT/summary.json`` (the setup, the counts of every finished chunk, this run's
rate), and the error that lists the chunks that still failed."""

from __future__ import annotations

import time
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.search.results.summary import summarize
from copyscan.search.results.write import finished_chunks
from copyscan.search.scan import ScanSetup
from copyscan.search.scan_chunks import QueryChunk


def write_summary(setup: ScanSetup, failed: list[tuple[QueryChunk, str]], started: float) -> dict[str, Any]:
    """Write and return the run's summary; ``failed``: chunks that failed for good, with the error;
    ``started``: when the run began (``time.time()``)."""
    cfg = setup.cfg
    markers = finished_chunks(cfg.out, cfg.storage_options)
    summary = scan_summary(setup, markers, failed, time.time() - started)
    storage.write_json(layout.summary_url(cfg.out), summary, cfg.storage_options)
    return summary


def scan_summary(
    setup: ScanSetup, markers: dict[int, dict[str, Any]], failed: list[tuple[QueryChunk, str]], seconds: float
) -> dict[str, Any]:
    """The summary of a run that took ``seconds``, from the markers of every finished chunk (``markers``)."""
    cfg, manifest = setup.cfg, setup.manifest
    # the region fan-out's hits per window; None when this run searched nothing (it started no fan-out)
    region_hits = (cfg.region_hits or cfg.k) if setup.todo else None
    return {
        "index": cfg.index,
        "index_vectors": manifest["ntotal"],
        "index_build_id": manifest["build_id"],
        "index_factory": manifest["index"]["factory"],
        "embedder": manifest["embedder"]["name"],
        "queries_spec": cfg.queries,
        "k": cfg.k,
        "search": setup.settings,  # re-rank depth and nprobe used, and where each came from
        # partial copies: windows, region index
        "regions": setup.local.describe(region_hits) if setup.local is not None else None,
        "threshold": setup.threshold or {"name": str(cfg.threshold), "calibrated": False},
        "partial_threshold": setup.partial_threshold
        or {"name": str(cfg.partial_threshold), "calibrated": False, "why": setup.partial_why},
        "extraction_delta": cfg.extraction_delta if cfg.verify_pixels else None,
        **summarize(markers),
        "skipped": skipped_summary(setup.skipped),
        "chunks_total": len(setup.chunks),
        "failed_chunks": [{"chunk": c.chunk, "source": c.describe(), "error": err} for c, err in failed],
        "this_run": _this_run(setup.todo, markers, seconds),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# skipped files named in the summary (the count covers all of them)
SKIPPED_NAMED = 100


def skipped_summary(skipped: list[dict[str, str]]) -> dict[str, Any]:
    """Files of the query folder that were not queries: how many, by reason, and the first ones."""
    by_reason: dict[str, int] = {}
    for entry in skipped:
        by_reason[entry["reason"]] = by_reason.get(entry["reason"], 0) + 1
    return {
        "count": len(skipped),
        "by_reason": dict(sorted(by_reason.items())),
        "files": skipped[:SKIPPED_NAMED],
    }


def _this_run(todo: list[QueryChunk], markers: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    queries = sum(markers[c.chunk]["queries"] for c in todo if c.chunk in markers)
    return {
        "chunks": len(todo),
        "seconds": round(seconds, 3),
        "queries_per_second": round(queries / seconds, 2) if seconds > 0 else None,
    }


def raise_if_failed(failed: list[tuple[QueryChunk, str]]) -> None:
    """Raise the error that lists the chunks that failed for good (a rerun resumes them), if any."""
    if failed:
        listing = "\n".join(f"  {c.describe()}: {err}" for c, err in failed)
        raise CopyscanError(f"{len(failed)} query chunk(s) failed; rerun to resume:\n{listing}")
