"""Writing one query chunk of a scan: its query vectors, its matches and, last, its marker (the resume
point and the source of the run's summary).

Layout of a scan output ``OUT`` (paths from ``copyscan.indexing.store.layout``)::

    OUT/run.yaml                        resolved scan config (written first)
    OUT/matches/part-00000.parquet      top-k matches of chunk 0 (schema MATCHES_SCHEMA)
    OUT/query_emb/query_emb_00000.npy   (n, d) float16 query descriptors of chunk 0
    OUT/query_emb/query_ids_00000.parquet  query ids aligned with those rows
    OUT/chunks/chunk_00000.json         per-chunk marker, written last: counts, rejected queries, timings
    OUT/summary.json                    written at the end of the run

``pyarrow.parquet.read_table("OUT/matches")`` reads every match; ``copyscan.search.results.open(OUT)`` gives a
dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from copyscan.indexing.store import layout, storage
from copyscan.search.ann.topk import ShardResult
from copyscan.search.results.matches import matches_table, with_columns

if TYPE_CHECKING:
    from copyscan.search.regions.result import LocalResult


def write_chunk(
    out: str,
    chunk: int,
    xq: np.ndarray,
    records: list[dict[str, Any]],
    rejections: list[dict[str, Any]],
    result: ShardResult,
    marker: dict[str, Any],
    storage_options: storage.StorageOptions | None = None,
    threshold: dict[str, Any] | None = None,
    verify: Callable[[pa.Table], tuple[pa.Table, dict[str, Any]]] | None = None,
    local: LocalResult | None = None,
    partial_threshold: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a chunk's query vectors (xq: (n, d) float32, stored float16; ``records[i]`` describes row i),
    matches and, last, its marker: ``marker`` with the chunk's counts (``chunk_marker``). Returns the marker.

    ``verify`` (``copyscan.search.verify.matches.verify_matches`` bound to the index) sets the pixel columns
    of the matches before they are written; its counts go into the marker under ``verify``.
    ``partial_threshold`` ({"rank", "column", "value"},
    ``copyscan.search.calibrate.thresholds.resolve_partial_threshold``) then sets ``is_partial_copy`` on each
    query's partial answer."""
    storage.save_npy(layout.query_emb_url(out, chunk), xq.astype(np.float16), storage_options)
    ids = pa.table({"query_id": [r["key"] for r in records], "query_source": [r.get("url") for r in records]})
    storage.write_parquet(layout.query_ids_url(out, chunk), ids, storage_options)
    table = matches_table(records, result, chunk, threshold, local)
    verify_stats = None
    if verify is not None:
        table, verify_stats = verify(table)
    if threshold is not None and "rank" in threshold:  # verify_score's: set once verification made it
        table = flag_verified(table, threshold)
    if partial_threshold is not None:  # after verification: dense_rank and dense_score come from it
        table = flag_partial(table, partial_threshold)
    storage.write_parquet(layout.matches_url(out, chunk), table, storage_options)
    marker = chunk_marker(
        marker, chunk, records, rejections, table, result, local, threshold, partial_threshold, verify_stats
    )
    storage.write_json(layout.chunk_marker_url(out, chunk), marker, storage_options)
    return marker


def flag_verified(table: pa.Table, threshold: dict[str, Any]) -> pa.Table:
    """``table`` with ``is_copy`` set from whole-copy verification: whether a row's ``column``
    (``verify_score``) passes ``value``; False where the row was not verified."""
    passes = pc.greater_equal(table[threshold["column"]], threshold["value"])
    return with_columns(table, {"is_copy": pc.fill_null(passes, False)})


def flag_partial(table: pa.Table, partial_threshold: dict[str, Any]) -> pa.Table:
    """``table`` with ``is_partial_copy`` set on the partial answers (rank column ``partial_threshold["rank"]``
    = 0): whether their ``column`` passes ``value``; null on the other rows."""
    answer = pc.equal(table[partial_threshold["rank"]], 0)
    passes = pc.greater_equal(table[partial_threshold["column"]], partial_threshold["value"])
    return with_columns(table, {"is_partial_copy": pc.if_else(answer, passes, pa.scalar(None, pa.bool_()))})


def chunk_marker(
    marker: dict[str, Any],
    chunk: int,
    records: list[dict[str, Any]],
    rejections: list[dict[str, Any]],
    table: pa.Table,
    result: ShardResult,
    local: LocalResult | None,
    threshold: dict[str, Any] | None,
    partial_threshold: dict[str, Any] | None,
    verify_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """A chunk's marker: ``marker`` (source, timings) followed by its counts, the top-1 scores of its
    queries, the verification counts and the region matching summary (``table``: its written matches)."""
    return {
        **marker,
        "chunk": chunk,
        "queries": len(records) + len(rejections),
        "embedded": len(records),
        "rejected": len(rejections),
        "rejections": rejections,
        "matches": table.num_rows,
        **_flagged(table, threshold, partial_threshold),
        "top1_scores": _finite(result.D[:, 0] if result.D.shape[1] else np.zeros(0, dtype=np.float32)),
        "top1_scores_norm": _finite(
            result.D_norm[:, 0] if result.D.shape[1] else np.zeros(0, dtype=np.float32)
        ),
        "verify": verify_stats,  # None: pixel verification off
        # region matching (None: off): windows per query, and the best local_score_norm of every query
        "local": None if local is None else _local_marker(table, local),
    }


def _finite(values: np.ndarray) -> list[float]:
    return [float(x) for x in values[np.isfinite(values)]]


def _flagged(
    table: pa.Table, threshold: dict[str, Any] | None, partial_threshold: dict[str, Any] | None
) -> dict[str, int | None]:
    """Queries whose best match passes the threshold (``flagged``), whose partial answer passes the partial
    threshold (``flagged_partial``), and flagged either way (``flagged_any``); None without the threshold(s)."""
    best = pc.equal(table[(threshold or {}).get("rank", "rank")], 0)  # the answer: verify_rank 0 if verified
    flagged = None if threshold is None else int(pc.sum(pc.and_(best, table["is_copy"])).as_py() or 0)
    partial = None if partial_threshold is None else int(pc.sum(table["is_partial_copy"]).as_py() or 0)
    either = None
    if threshold is not None and partial_threshold is not None:
        flags = pc.or_kleene(pc.and_kleene(best, table["is_copy"]), table["is_partial_copy"])
        either = len(set(table.filter(flags)["query_id"].to_pylist()))
    return {"flagged": flagged, "flagged_partial": partial, "flagged_any": either}


def _local_marker(table: pa.Table, local: LocalResult) -> dict[str, Any]:
    return {
        "windows": len(local.query_boxes),
        "local_only_rows": int(pc.sum(pc.is_null(table["rank"])).as_py() or 0),
        # queries whose best local match a crop searched in the global index found (region_refine)
        "top1_found_by_crop": int(np.isfinite(local.crop[:, 0]).sum())
        if local.crop is not None and local.I.shape[1]
        else 0,
        "top1_local_scores_norm": _finite(local.S_norm[:, 0]) if local.S_norm.shape[1] else [],
    }


def finished_chunks(
    out: str, storage_options: storage.StorageOptions | None = None
) -> dict[int, dict[str, Any]]:
    """{chunk: its marker} of the chunks a scan into ``out`` has finished (what a resumed scan skips)."""
    return storage.read_markers(layout.chunks_dir(out), layout.CHUNK_MARKER_PREFIX, storage_options)
