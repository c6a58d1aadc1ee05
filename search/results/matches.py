"""Scan results: a parquet dataset of matches, written one part per query chunk, and its summary.

Layout of a scan output ``OUT``::

    OUT/run.yaml                        resolved scan config (written first)
    OUT/matches/part-00000.parquet      top-k matches of chunk 0 (schema MATCHES_SCHEMA)
    OUT/query_emb/query_emb_00000.npy   (n, d) float16 query descriptors of chunk 0
    OUT/query_emb/query_ids_00000.parquet  query ids aligned with those rows
    OUT/chunks/chunk_00000.json         per-chunk marker, written last: counts, rejected queries, timings
    OUT/summary.json                    written at the end of the run

``pyarrow.parquet.read_table("OUT/matches")`` reads every match; ``open_matches(OUT)`` gives a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from indexing.store import layout, storage
from search.ann.topk import ShardResult

if TYPE_CHECKING:
    from search.regions.local import LocalResult


MATCHES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),  # file name (image folders) or __key__ (webdataset queries)
        ("rank", pa.int32()),  # 0 = best
        ("train_key", pa.string()),  # img2dataset key of the training image
        ("score", pa.float32()),  # exact cosine of the (whitened) descriptors, higher = more similar; ranks
        ("score_norm", pa.float32()),  # score - beta * background bias: comparable across queries
        ("score_raw", pa.float32()),  # cosine of the raw (unwhitened) descriptors
        ("is_copy", pa.bool_()),  # passes the scan's threshold (summary.json says which); null: no threshold
        ("train_url", pa.string()),
        ("caption", pa.string()),
        ("index_shard", pa.int32()),
        ("train_id", pa.int64()),  # packed (embedding shard << 32 | row)
        ("embedding_shard", pa.int32()),
        ("row", pa.int32()),
        ("query_source", pa.string()),  # URL of the query file or shard
        ("chunk", pa.int32()),
        # the generation's prompt: its JSON sidecar's "prompt", else its caption (.txt); null for image files
        ("prompt", pa.string()),
        # pixel verification (scan option verify_pixels, search/verify/matches.py); null where not verified
        ("pixel_l2", pa.float32()),  # RMS pixel difference in [0, 1] after alignment (Carlini et al.'s l2)
        ("tiled_l2", pa.float32()),  # max over 4 x 4 tiles of the tile's RMS difference
        ("extracted", pa.bool_()),  # tiled_l2 < extraction_delta (0.15)
        ("verify_error", pa.string()),  # why a selected pair has no distances (train_key_not_found, ...)
        # scan option density_neighbours: pixel_l2 / (alpha x mean pixel_l2 to the query's top matches);
        # < 1 = extracted by Carlini et al.'s density-relative test (unconditional models)
        ("density_l2", pa.float32()),
        # partial copies (search/regions/local.py, indexes built with regions=true): the image's best (query window,
        # training region) pair. A row found only by region matching has null rank and global scores; a row
        # found only globally has null local columns.
        ("local_rank", pa.int32()),  # 0 = the query's best image by local_score_norm
        ("local_score", pa.float32()),  # cosine of the pair in the region index's (whitened) space
        ("local_score_norm", pa.float32()),  # local_score - beta * the window's background bias
        ("local_score_raw", pa.float32()),  # cosine of the pair's raw descriptors
        ("query_box", pa.list_(pa.float32(), 4)),  # the window in the generation: x0, y0, x1, y1 fractions
        ("train_box", pa.list_(pa.float32(), 4)),  # the region in the training image, likewise
        # localise, then search (scan region_refine): the image's best score_norm when crops of the generation,
        # cut where region matching located training images, were searched in the global index, and that
        # crop; null when no crop found it. Added (clipped at 0) to local_score_norm. An image only a crop
        # found has the crop's local_score / local_score_raw, query_box = the crop, train_box = 0, 0, 1, 1
        ("crop_score_norm", pa.float32()),
        ("crop_box", pa.list_(pa.float32(), 4)),
        # Somepalli et al.'s split product, position-aligned, every chunk a cosine (scan split_product=true):
        # max over the index's region boxes of cos(query box, same box of the training image); null when off
        ("split_score", pa.float32()),
        # dense verification (scan dense_verify, search/verify/dense.py) of the region candidates of local_rank <
        # dense_verify; null where not verified. dense_z: by how many standard deviations the training
        # image's best placement in the generation (block-10 feature maps, searched over offset and scale)
        # stands out from its other placements; dense_rank: rank by dense_z among the generation's verified
        # candidates (0 = its answer); dense_box: that placement; dense_score = local_score_norm +
        # dense_weight * dense_z, the answer's confidence; dense_error: why a selected row was not verified
        ("dense_rank", pa.int32()),
        ("dense_z", pa.float32()),
        ("dense_box", pa.list_(pa.float32(), 4)),
        ("dense_score", pa.float32()),
        ("dense_error", pa.string()),
        # the partial answer (dense_rank 0 with dense verification, else local_rank 0) passes the scan's
        # partial threshold (copyscan calibrate partial=N; summary.json's partial_threshold says which); null
        # on other rows and without one
        ("is_partial_copy", pa.bool_()),
    ]
)


def _flags(result: ShardResult, q_idx: np.ndarray, ranks: np.ndarray, threshold: dict[str, Any] | None):
    if threshold is None:
        return pa.nulls(len(q_idx), pa.bool_())
    values = {"score": result.D, "score_norm": result.D_norm, "score_raw": result.D_raw}[threshold["column"]]
    return pa.array(values[q_idx, ranks] >= threshold["value"], pa.bool_())  # NaN compares False


def matches_table(
    records: list[dict[str, Any]],
    result: ShardResult,
    chunk: int,
    threshold: dict[str, Any] | None = None,
    local: LocalResult | None = None,
) -> pa.Table:
    """One row per (query, rank) with a valid id; ``records[i]`` describes query row i of ``result``.

    ``threshold`` ({"column", "value"}, ``search.calibrate.whole.resolve_threshold``) sets ``is_copy``. With
    ``local`` (region matching), the local columns are filled for the images it found, and the images it
    found that are not among the query's global top k get rows of their own (null rank and global scores).
    """
    D, I = result.D, result.I
    q_idx, ranks = np.nonzero(I >= 0)
    ids = I[q_idx, ranks]
    shard, row = layout.unpack_ids(ids)
    meta = [result.meta[int(i)] for i in ids]
    columns = {
        "query_id": [records[q]["key"] for q in q_idx],
        "rank": ranks.astype(np.int32),
        "train_key": [m["train_key"] for m in meta],
        "score": D[q_idx, ranks].astype(np.float32),
        "score_norm": result.D_norm[q_idx, ranks].astype(np.float32),
        "score_raw": result.D_raw[q_idx, ranks].astype(np.float32),
        "is_copy": _flags(result, q_idx, ranks, threshold),
        "train_url": [m["train_url"] for m in meta],
        "caption": [m["caption"] for m in meta],
        "index_shard": np.array([m["index_shard"] for m in meta], dtype=np.int32),
        "train_id": ids.astype(np.int64),
        "embedding_shard": shard.astype(np.int32),
        "row": row.astype(np.int32),
        "query_source": [records[q].get("url") for q in q_idx],
        "chunk": np.full(len(ids), chunk, dtype=np.int32),
        "prompt": [records[q].get("prompt") or records[q].get("caption") for q in q_idx],
        "pixel_l2": pa.nulls(len(ids), pa.float32()),
        "tiled_l2": pa.nulls(len(ids), pa.float32()),
        "extracted": pa.nulls(len(ids), pa.bool_()),
        "verify_error": pa.nulls(len(ids), pa.string()),
        "density_l2": pa.nulls(len(ids), pa.float32()),
    }
    for name in (
        "local_rank",
        "local_score",
        "local_score_norm",
        "local_score_raw",
        "query_box",
        "train_box",
        "crop_score_norm",
        "crop_box",
        "dense_rank",
        "dense_z",
        "dense_box",
        "dense_score",
        "dense_error",
        "is_partial_copy",
    ):
        columns[name] = pa.nulls(len(ids), MATCHES_SCHEMA.field(name).type)
    split = result.split[q_idx, ranks].astype(np.float32) if result.split is not None else None
    columns["split_score"] = (
        pa.nulls(len(ids), pa.float32()) if split is None else pa.array(split, mask=np.isnan(split))
    )
    table = pa.table(columns, schema=MATCHES_SCHEMA)
    return table if local is None else _with_local(table, records, q_idx, ids, local, chunk)


def _with_local(
    table: pa.Table,
    records: list[dict[str, Any]],
    q_idx: np.ndarray,
    ids: np.ndarray,
    local: LocalResult,
    chunk: int,
) -> pa.Table:
    """``table`` (global rows of queries ``q_idx`` / images ``ids``) with the local columns set, plus rows for
    the images only region matching found, ordered by query then rank (local-only rows last)."""
    lq, lr = np.nonzero(local.I >= 0)
    lids = local.I[lq, lr]
    row_of = {(int(q), int(i)): n for n, (q, i) in enumerate(zip(q_idx, ids, strict=True))}
    n_global = table.num_rows
    extra = [(q, r) for q, r, i in zip(lq, lr, lids, strict=True) if (int(q), int(i)) not in row_of]
    n = n_global + len(extra)
    local_rank = np.full(n, -1, dtype=np.int32)
    values = {
        name: np.full(n, np.nan, dtype=np.float32)
        for name in ("local_score", "local_score_norm", "local_score_raw")
    }
    qbox = np.full((n, 4), np.nan, dtype=np.float32)
    tbox = np.full((n, 4), np.nan, dtype=np.float32)
    crop = np.full(n, np.nan, dtype=np.float32)
    cbox = np.full((n, 4), np.nan, dtype=np.float32)
    at = dict(row_of)
    for m, (q, r) in enumerate(extra):
        at[(int(q), int(local.I[q, r]))] = n_global + m
    for q, r, i in zip(lq, lr, lids, strict=True):
        row = at[(int(q), int(i))]
        local_rank[row] = r
        values["local_score"][row] = local.S[q, r]
        values["local_score_norm"][row] = local.S_norm[q, r]
        values["local_score_raw"][row] = local.S_raw[q, r]
        qbox[row] = local.qbox[q, r]
        tbox[row] = local.tbox[q, r]
        if local.crop is not None:
            crop[row], cbox[row] = local.crop[q, r], local.crop_box[q, r]
    if extra:
        eq = np.array([q for q, _ in extra], dtype=np.int64)
        eids = np.array([local.I[q, r] for q, r in extra], dtype=np.int64)
        shard, row = layout.unpack_ids(eids)
        meta = [local.meta[int(i)] for i in eids]
        rows = {
            "query_id": [records[q]["key"] for q in eq],
            "train_key": [m["train_key"] for m in meta],
            "is_copy": pa.nulls(len(eq), pa.bool_())
            if table["is_copy"].null_count == n_global
            else [False] * len(eq),
            "train_url": [m["train_url"] for m in meta],
            "caption": [m["caption"] for m in meta],
            "index_shard": np.array([m["index_shard"] for m in meta], dtype=np.int32),
            "train_id": eids,
            "embedding_shard": shard.astype(np.int32),
            "row": row.astype(np.int32),
            "query_source": [records[q].get("url") for q in eq],
            "chunk": np.full(len(eq), chunk, dtype=np.int32),
            "prompt": [records[q].get("prompt") or records[q].get("caption") for q in eq],
        }
        if local.split is not None:
            split = np.array([local.split[q, r] for q, r in extra], dtype=np.float32)
            rows["split_score"] = pa.array(split, mask=np.isnan(split))
        more = pa.table(
            {f.name: rows[f.name] if f.name in rows else pa.nulls(len(eq), f.type) for f in MATCHES_SCHEMA},
            schema=MATCHES_SCHEMA,
        )
        table = pa.concat_tables([table, more])
        order = np.lexsort((np.r_[np.zeros(n_global), np.ones(len(extra))], np.r_[q_idx, eq]))
    else:
        order = np.arange(n)
    table = table.set_column(
        table.schema.get_field_index("local_rank"), "local_rank", pa.array(local_rank, mask=local_rank < 0)
    )
    for name, v in values.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(v, mask=np.isnan(v)))
    table = table.set_column(
        table.schema.get_field_index("crop_score_norm"),
        "crop_score_norm",
        pa.array(crop, mask=np.isnan(crop)),
    )
    for name, boxes in (("query_box", qbox), ("train_box", tbox), ("crop_box", cbox)):
        flat = pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4)
        mask = pa.array(np.isnan(boxes[:, 0]))
        table = table.set_column(
            table.schema.get_field_index(name), name, pa.compute.if_else(mask, pa.nulls(n, flat.type), flat)
        )
    return table.take(pa.array(order))


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
    """Write a chunk's query vectors, matches and, last, its marker. Returns the marker.

    ``verify`` (``search.verify.matches.verify_matches`` bound to the index) sets the pixel columns of the
    matches before they are written; its counts go into the marker under ``verify``. ``partial_threshold``
    ({"rank", "column", "value"}, ``search.calibrate.partial.resolve_partial_threshold``) then sets
    ``is_partial_copy`` on each query's partial answer."""
    storage.save_npy(layout.query_emb_url(out, chunk), xq.astype(np.float16), storage_options)
    ids = pa.table({"query_id": [r["key"] for r in records], "query_source": [r.get("url") for r in records]})
    storage.write_parquet(layout.query_ids_url(out, chunk), ids, storage_options)
    table = matches_table(records, result, chunk, threshold, local)
    verify_stats = None
    if verify is not None:
        table, verify_stats = verify(table)
    if partial_threshold is not None:  # after verification: dense_rank and dense_score come from it
        answer = pc.equal(table[partial_threshold["rank"]], 0)
        passes = pc.greater_equal(table[partial_threshold["column"]], partial_threshold["value"])
        table = with_columns(
            table, {"is_partial_copy": pc.if_else(answer, passes, pa.scalar(None, pa.bool_()))}
        )
    storage.write_parquet(layout.matches_url(out, chunk), table, storage_options)
    top1 = result.D[:, 0] if result.D.shape[1] else np.zeros(0, dtype=np.float32)
    top1_norm = result.D_norm[:, 0] if result.D.shape[1] else np.zeros(0, dtype=np.float32)
    marker = {
        **marker,
        "chunk": chunk,
        "queries": len(records) + len(rejections),
        "embedded": len(records),
        "rejected": len(rejections),
        "rejections": rejections,
        "matches": table.num_rows,
        # queries whose best match passes the threshold (None: no threshold)
        "flagged": None
        if threshold is None
        else int(pc.sum(pc.and_(pc.equal(table["rank"], 0), table["is_copy"])).as_py() or 0),
        # queries whose partial answer passes the partial threshold, and flagged either way (None: none)
        "flagged_partial": None
        if partial_threshold is None
        else int(pc.sum(table["is_partial_copy"]).as_py() or 0),
        "flagged_any": None
        if threshold is None or partial_threshold is None
        else len(
            set(
                table.filter(
                    pc.or_kleene(
                        pc.and_kleene(pc.equal(table["rank"], 0), table["is_copy"]),
                        table["is_partial_copy"],
                    )
                )["query_id"].to_pylist()
            )
        ),
        "top1_scores": [float(x) for x in top1[np.isfinite(top1)]],
        "top1_scores_norm": [float(x) for x in top1_norm[np.isfinite(top1_norm)]],
        "verify": verify_stats,  # None: pixel verification off
        # region matching (None: off): windows per query, and the best local_score_norm of every query
        "local": None
        if local is None
        else {
            "windows": len(local.query_boxes),
            "local_only_rows": int(pc.sum(pc.is_null(table["rank"])).as_py() or 0),
            # queries whose best local match a crop searched in the global index found (region_refine)
            "top1_found_by_crop": int(np.isfinite(local.crop[:, 0]).sum())
            if local.crop is not None and local.I.shape[1]
            else 0,
            "top1_local_scores_norm": [float(x) for x in local.S_norm[:, 0][np.isfinite(local.S_norm[:, 0])]]
            if local.S_norm.shape[1]
            else [],
        },
    }
    storage.write_json(layout.chunk_marker_url(out, chunk), marker, storage_options)
    return marker


def finished_chunks(
    out: str, storage_options: storage.StorageOptions | None = None
) -> dict[int, dict[str, Any]]:
    return storage.read_markers(layout.chunks_dir(out), layout.CHUNK_MARKER_PREFIX, storage_options)


def _distribution(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        **{f"p{q}": float(np.percentile(values, q)) for q in (50, 75, 90, 95, 99)},
        "max": float(values.max()),
    }


def summarize(markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Run-level counts and the distributions of top-1 ``score`` and ``score_norm`` (one per query)."""
    by_reason: dict[str, int] = {}
    for m in markers.values():
        for rej in m["rejections"]:
            by_reason[rej["reason"]] = by_reason.get(rej["reason"], 0) + 1
    summary: dict[str, Any] = {
        "chunks": len(markers),
        "queries": sum(m["queries"] for m in markers.values()),
        "embedded": sum(m["embedded"] for m in markers.values()),
        "rejected": sum(m["rejected"] for m in markers.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "matches": sum(m["matches"] for m in markers.values()),
        "flagged": None
        if any(m.get("flagged") is None for m in markers.values())
        else sum(m["flagged"] for m in markers.values()),
    }
    for name in ("flagged_partial", "flagged_any"):  # scans with a partial threshold
        if markers and all(m.get(name) is not None for m in markers.values()):
            summary[name] = sum(m[name] for m in markers.values())
    radius = [m["radius"] for m in markers.values() if m.get("radius")]
    if radius:  # scan option radius: matches past the top k (search.ann.radius.radius_counts)
        summary["radius"] = {name: sum(r[name] for r in radius) for name in radius[0]}
    verification = summarize_verification(markers)
    if verification is not None:
        summary["verification"] = verification
    for name, key in (("top1_score", "top1_scores"), ("top1_score_norm", "top1_scores_norm")):
        values = np.array([s for m in markers.values() for s in m.get(key, [])], dtype=np.float64)
        if len(values):
            summary[name] = _distribution(values)
    return summary


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """``table`` with ``columns`` replaced (or appended when absent)."""
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    return table


def summarize_verification(markers: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Run-level verification counts (pixels, dense) from the chunk markers (None when none was verified).

    ``extracted_queries``: generations with at least one (l2, delta)-extracted match; ``errors``: pairs
    that could not be verified, by reason; ``density``: density-relative counts (scan option
    density_neighbours), when on; ``dense``: dense-verification counts (scan option dense_verify), when on."""
    markers_verify = [m["verify"] for m in markers.values() if m.get("verify")]
    verified = [v for v in markers_verify if "verify_pairs" in v]
    dense = [v for v in markers_verify if "dense_pairs" in v]
    if not verified and not dense:
        return None
    out: dict[str, Any] = {}
    if verified:
        out.update(
            {
                "chunks": len(verified),
                "pairs": sum(v["verify_pairs"] for v in verified),
                "verified": sum(v["verified"] for v in verified),
                "extracted": sum(v["extracted"] for v in verified),
                # chunks hold distinct queries
                "extracted_queries": sum(v["extracted_queries"] for v in verified),
                "errors": _sum_counts(v["verify_errors"] for v in verified),
            }
        )
    if any("density_scored" in v for v in verified):
        names = ("density_scored", "density_extracted", "neighbour_pairs", "neighbour_failed")
        out["density"] = {name: sum(v.get(name, 0) for v in verified) for name in names}
    if dense:
        out["dense"] = {
            "chunks": len(dense),
            "pairs": sum(v["dense_pairs"] for v in dense),
            "verified": sum(v["dense_verified"] for v in dense),
            "no_fit": sum(v["dense_no_fit"] for v in dense),
            "errors": _sum_counts(v["dense_errors"] for v in dense),
            "seconds": round(sum(v["dense_seconds"]["total"] for v in dense), 1),
        }
    return out


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """{reason: count} dicts added up, sorted by reason."""
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def open_matches(out: str, storage_options: storage.StorageOptions | None = None) -> pads.Dataset:
    """The matches of a scan as a pyarrow dataset (filter/aggregate without loading everything)."""
    fs, path = storage.get_fs(layout.matches_dir(out), storage_options)
    return pads.dataset(path, filesystem=fs, format="parquet", schema=MATCHES_SCHEMA)


def open(  # noqa: A001 - the documented entry point: ``from search import results; results.open(url)``
    out: str,
    storage_options: storage.StorageOptions | None = None,
    engine: str = "arrow",
    connection: Any = None,
) -> Any:
    """A scan's matches for batch analytics: a pyarrow dataset (``engine="arrow"``) or a DuckDB relation
    (``engine="duckdb"``, on ``connection`` or a new in-memory one). Nothing is read until it is queried."""
    dataset = open_matches(out, storage_options)
    if engine == "arrow":
        return dataset
    if engine == "duckdb":
        import duckdb

        return (connection or duckdb.connect()).from_arrow(dataset)
    raise ValueError(f"engine must be 'arrow' or 'duckdb', not {engine!r}")
