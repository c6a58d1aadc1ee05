"""The matches table of a scan: its parquet schema (``MATCHES_SCHEMA``) and the rows of one query chunk
(``matches_table``): one per (query, rank) of the global search, plus the images only region matching found.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from copyscan.indexing.embed.provenance import PROVENANCE
from copyscan.indexing.store import layout
from copyscan.search.ann.topk import ShardResult

if TYPE_CHECKING:
    from copyscan.search.regions.result import LocalResult


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
        # partial copies (search/regions/, indexes built with regions=true): the image's best (query window,
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
        # whole-copy verification (scan verify_whole, search/verify/whole.py) of the global matches of rank <
        # verify_whole; null where not verified. verify_peak: the highest mean cosine of the generation's
        # block-10 cells against the training image's (resampled to 55-95 % of it, at every offset);
        # verify_score = score_norm + verify_whole_weight x (verify_peak - the mean of the 3 highest peaks of
        # the generation's other verified matches), the answer's confidence; verify_rank: rank by
        # verify_score among the generation's verified matches (0 = its answer); verify_whole_error: why a
        # selected row was not verified
        ("verify_rank", pa.int32()),
        ("verify_peak", pa.float32()),
        ("verify_score", pa.float32()),
        ("verify_whole_error", pa.string()),
        # the partial answer (dense_rank 0 with dense verification, else local_rank 0) passes the scan's
        # partial threshold (copyscan calibrate partial=N; summary.json's partial_threshold says which); null
        # on other rows and without one
        ("is_partial_copy", pa.bool_()),
        # the training image's provenance, from its source metadata where it has them
        # (indexing/embed/provenance.py; null for indexes built before these columns)
        ("sha256", pa.string()),  # of the image's bytes as downloaded (img2dataset compute_hash)
        ("license", pa.string()),  # LAION's LICENSE
        ("pwatermark", pa.float32()),  # LAION's watermark probability
        ("punsafe", pa.float32()),  # LAION's NSFW probability
        ("clip_similarity", pa.float32()),  # LAION's similarity: CLIP cosine of image and caption
    ]
)


PROVENANCE_COLUMNS = ("sha256", *PROVENANCE)


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """``table`` with ``columns`` replaced (or appended when absent)."""
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    return table


def _flags(result: ShardResult, q_idx: np.ndarray, ranks: np.ndarray, threshold: dict[str, Any] | None):
    values = {"score": result.D, "score_norm": result.D_norm, "score_raw": result.D_raw}
    if threshold is None or threshold["column"] not in values:  # verify_score: set after verification
        return pa.nulls(len(q_idx), pa.bool_())
    values = values[threshold["column"]]
    return pa.array(values[q_idx, ranks] >= threshold["value"], pa.bool_())  # NaN compares False


def _query_columns(records: list[dict[str, Any]], q_idx: np.ndarray, chunk: int) -> dict[str, Any]:
    """The columns describing the query of each row (``records[q_idx[n]]`` for row n)."""
    return {
        "query_id": [records[q]["key"] for q in q_idx],
        "query_source": [records[q].get("url") for q in q_idx],
        "chunk": np.full(len(q_idx), chunk, dtype=np.int32),
        "prompt": [records[q].get("prompt") or records[q].get("caption") for q in q_idx],
    }


def _train_columns(ids: np.ndarray, meta: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns describing the training image of each row: ids (n,) int64 packed ids, meta their
    metadata."""
    shard, row = layout.unpack_ids(ids)
    return {
        "train_key": [m["train_key"] for m in meta],
        "train_url": [m["train_url"] for m in meta],
        "caption": [m["caption"] for m in meta],
        **{c: [m.get(c) for m in meta] for c in PROVENANCE_COLUMNS},
        "index_shard": np.array([m["index_shard"] for m in meta], dtype=np.int32),
        "train_id": ids.astype(np.int64),
        "embedding_shard": shard.astype(np.int32),
        "row": row.astype(np.int32),
    }


def _table(columns: dict[str, Any], n: int) -> pa.Table:
    """A table of ``n`` rows in ``MATCHES_SCHEMA``: ``columns``, nulls for the columns not given."""
    return pa.table(
        {f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in MATCHES_SCHEMA},
        schema=MATCHES_SCHEMA,
    )


def _nan_as_null(values: np.ndarray) -> pa.Array:
    return pa.array(values, mask=np.isnan(values))


def matches_table(
    records: list[dict[str, Any]],
    result: ShardResult,
    chunk: int,
    threshold: dict[str, Any] | None = None,
    local: LocalResult | None = None,
) -> pa.Table:
    """One row per (query, rank) with a valid id; ``records[i]`` describes query row i of ``result``.

    ``threshold`` ({"column", "value"}, ``copyscan.search.calibrate.thresholds.resolve_threshold``) sets
    ``is_copy``. With ``local`` (region matching), the local columns are filled for the images it found, and
    the images it found that are not among the query's global top k get rows of their own (null rank and
    global scores).
    """
    q_idx, ranks = np.nonzero(result.I >= 0)
    ids = result.I[q_idx, ranks]
    columns = {
        **_query_columns(records, q_idx, chunk),
        **_train_columns(ids, [result.meta[int(i)] for i in ids]),
        "rank": ranks.astype(np.int32),
        "score": result.D[q_idx, ranks].astype(np.float32),
        "score_norm": result.D_norm[q_idx, ranks].astype(np.float32),
        "score_raw": result.D_raw[q_idx, ranks].astype(np.float32),
        "is_copy": _flags(result, q_idx, ranks, threshold),
    }
    if result.split is not None:
        columns["split_score"] = _nan_as_null(result.split[q_idx, ranks].astype(np.float32))
    table = _table(columns, len(ids))
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
    at = {(int(q), int(i)): n for n, (q, i) in enumerate(zip(q_idx, ids, strict=True))}
    n_global = table.num_rows
    extra = [(q, r) for q, r in zip(lq, lr, strict=True) if (int(q), int(local.I[q, r])) not in at]
    for m, (q, r) in enumerate(extra):
        at[(int(q), int(local.I[q, r]))] = n_global + m
    rows = np.array([at[(int(q), int(local.I[q, r]))] for q, r in zip(lq, lr, strict=True)], dtype=np.int64)
    n = n_global + len(extra)
    order = np.arange(n)
    if extra:
        eq = np.array([q for q, _ in extra], dtype=np.int64)
        copy_nulls = table["is_copy"].null_count == n_global
        table = pa.concat_tables([table, _local_only_rows(records, local, extra, eq, chunk, copy_nulls)])
        order = np.lexsort((np.r_[np.zeros(n_global), np.ones(len(extra))], np.r_[q_idx, eq]))
    for name, values in _local_values(local, rows, lq, lr, n).items():
        table = table.set_column(table.schema.get_field_index(name), name, _local_column(name, values, n))
    return table.take(pa.array(order))


def _local_only_rows(
    records: list[dict[str, Any]],
    local: LocalResult,
    extra: list[tuple[int, int]],
    eq: np.ndarray,
    chunk: int,
    copy_nulls: bool,
) -> pa.Table:
    """Rows for the (query, local rank) pairs ``extra`` (queries ``eq``) of images only region matching
    found: their query and image, ``is_copy`` null when every global row's is (no threshold) else False,
    and their split score; the local columns are set afterwards."""
    eids = np.array([local.I[q, r] for q, r in extra], dtype=np.int64)
    columns = {
        **_query_columns(records, eq, chunk),
        **_train_columns(eids, [local.meta[int(i)] for i in eids]),
        "is_copy": pa.nulls(len(eq), pa.bool_()) if copy_nulls else [False] * len(eq),
    }
    if local.split is not None:
        columns["split_score"] = _nan_as_null(
            np.array([local.split[q, r] for q, r in extra], dtype=np.float32)
        )
    return _table(columns, len(eq))


# local column → the LocalResult attribute it comes from: the image's best region pair, and its best crop
_PAIR_COLUMNS = {
    "local_score": "S",
    "local_score_norm": "S_norm",
    "local_score_raw": "S_raw",
    "query_box": "qbox",
    "train_box": "tbox",
}
_CROP_COLUMNS = {"crop_score_norm": "crop", "crop_box": "crop_box"}


def _local_values(
    local: LocalResult, rows: np.ndarray, lq: np.ndarray, lr: np.ndarray, n: int
) -> dict[str, np.ndarray]:
    """The local columns of ``n`` rows as arrays (-1 / NaN where unset; boxes (n, 4)): row ``rows[m]``
    holds local pair (query ``lq[m]``, local rank ``lr[m]``)."""
    values = {"local_rank": np.full(n, -1, dtype=np.int32)}
    for name in (*_PAIR_COLUMNS, *_CROP_COLUMNS):
        values[name] = np.full((n, 4) if name.endswith("_box") else n, np.nan, dtype=np.float32)
    if not len(rows):
        return values
    values["local_rank"][rows] = lr
    sources = {**_PAIR_COLUMNS, **(_CROP_COLUMNS if local.crop is not None else {})}
    for name, attr in sources.items():
        values[name][rows] = getattr(local, attr)[lq, lr]
    return values


def _local_column(name: str, values: np.ndarray, n: int) -> pa.Array:
    """A local column's arrow array from its values: -1 ranks, NaN scores and NaN boxes are null."""
    if name == "local_rank":
        return pa.array(values, mask=values < 0)
    if values.ndim == 1:
        return _nan_as_null(values)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), 4)
    return pc.if_else(pa.array(np.isnan(values[:, 0])), pa.nulls(n, flat.type), flat)
