"""The embedding stage of one shard: decoded batches → descriptors → per-shard outputs, marker last.

Everything here is plain Python; ``embed_ray.py`` runs it on a Ray actor pool, and ``embed_shard`` runs
it in-process (benchmarks, small jobs, tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from copyscan.indexing.embed.decode import DecodedBatch, DecodeLimits, PairSpec, decode_samples
from copyscan.indexing.models.embedder import Embedder
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.models.regions import RegionSpec
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.store import layout, storage

METADATA_SCHEMA = pa.schema(
    [
        ("row", pa.int32()),
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("metadata_error", pa.string()),
        ("license", pa.string()),
        ("pwatermark", pa.float32()),
        ("punsafe", pa.float32()),
        ("clip_similarity", pa.float32()),
        # where the image's bytes lie in the source tar (uncompressed tars): fetched back by one ranged read
        ("tar_offset", pa.int64()),
        ("tar_size", pa.int64()),
    ]
)


@dataclass
class EmbeddedSource:
    """All descriptors of one shard / query chunk.

    xb: (n, d) float32, L2-normalised; records: n metadata dicts aligned with ``xb``;
    rejections: samples that could not be embedded, each ``{"key", "reason", "detail"}``.
    """

    xb: np.ndarray
    records: list[dict[str, Any]]
    rejections: list[dict[str, Any]]
    decode_seconds: float = 0.0
    embed_seconds: float = 0.0
    # the decode task's own seconds for these batches (``DecodedBatch.decode_seconds``, summed), and the
    # embedding actor's model totals when it returned them (``EmbedWorker.model_totals``)
    decode_task_seconds: float = 0.0
    decode_task_cpu_seconds: float = 0.0
    actor_model: dict[str, Any] | None = None
    # descriptors of augmented copies (learned whitening): x_pair (m, d) float32, pair_rows (m,) rows of xb
    x_pair: np.ndarray | None = None
    pair_rows: np.ndarray | None = None
    pair_errors: list[dict[str, Any]] = field(default_factory=list)
    # region vectors (``RegionSpec``): x_regions (n, R, d) float32, box r of image i in row i
    x_regions: np.ndarray | None = None
    # ``aligned`` boxes (the region index's own, for the split product): (n, R', d)
    x_aligned: np.ndarray | None = None
    # the pixels the windows were cut from (n, 3, S, S) uint8, when asked for (``keep_pixels``: a scan that
    # crops the query again where region matching located a training image, search/regions/windows.py)
    region_pixels: np.ndarray | None = None


@dataclass
class _Parts:
    """What ``embed_batches`` collects batch by batch, concatenated once at the end (``_finish``)."""

    xb: list[np.ndarray] = field(default_factory=list)  # (b, d) float32 per batch
    regions: list[np.ndarray] = field(default_factory=list)  # (b, R, d) float32
    aligned: list[np.ndarray] = field(default_factory=list)  # (b, R', d) float32
    pixels: list[np.ndarray] = field(default_factory=list)  # (b, 3, S, S) uint8 (keep_pixels)
    x_pair: list[np.ndarray] = field(default_factory=list)  # (m, d) float32
    pair_rows: list[np.ndarray] = field(default_factory=list)  # (m,) int64
    records: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    pair_errors: list[dict[str, Any]] = field(default_factory=list)
    embed_seconds: float = 0.0
    wait_seconds: float = 0.0
    task_seconds: float = 0.0
    task_cpu_seconds: float = 0.0

    def add_bookkeeping(self, batch: DecodedBatch) -> None:
        self.task_seconds += batch.decode_seconds
        self.task_cpu_seconds += batch.decode_cpu_seconds
        self.records.extend(batch.records)
        self.rejections.extend(batch.rejections)
        self.pair_errors.extend(batch.pair_errors)


def embed_batches(
    batches: Iterable[DecodedBatch],
    embedder: Embedder,
    regions: RegionSpec | None = None,
    aligned: RegionSpec | None = None,
    keep_pixels: bool = False,
    progress: Callable[[int], None] | None = None,
) -> EmbeddedSource:
    """Run ``embedder`` over decoded batches and concatenate the results in order.

    With ``regions``, also one vector per box and image (``x_regions``): pooled from the same pass
    (mode "pool": the global vector is then box 0's), or crops of the batches'
    ``region_pixels`` (mode "crop"), or pooled from one pass over the ``region_pixels`` (mode "rmac").
    ``aligned`` (queries of a split-product scan: the region index's boxes
    made like the index made them) adds ``x_aligned``; in mode "crop" it must share ``regions``' size.
    ``keep_pixels`` (modes "crop", "rmac") keeps the batches' ``region_pixels`` in the result.
    ``decode_seconds`` is the time spent waiting for the next batch, ``embed_seconds`` the time in the model.
    ``progress`` is called after each batch with the number of samples it took (accepted and rejected).
    """
    if keep_pixels and (regions is None or regions.mode == "pool"):
        raise ValueError("keep_pixels keeps the region_pixels (a RegionSpec in mode 'crop' or 'rmac')")
    parts = _Parts()
    t_wait = time.perf_counter()
    for batch in batches:
        parts.wait_seconds += time.perf_counter() - t_wait
        t0 = time.perf_counter()
        _embed_batch(batch, embedder, regions, aligned, keep_pixels, parts)
        parts.embed_seconds += time.perf_counter() - t0
        parts.add_bookkeeping(batch)
        if progress is not None:
            progress(len(batch.records) + len(batch.rejections))
        t_wait = time.perf_counter()
    return _finish(parts, embedder.dim, regions, aligned, keep_pixels)


def _embed_batch(
    batch: DecodedBatch,
    embedder: Embedder,
    regions: RegionSpec | None,
    aligned: RegionSpec | None,
    keep_pixels: bool,
    parts: _Parts,
) -> None:
    """One batch's global, pair, region and aligned vectors, appended to ``parts``."""
    if regions is not None and regions.mode == "pool":
        _embed_pooled(batch, embedder, regions, parts)
        _embed_pairs(batch, embedder, parts)
    else:
        if len(batch.pixels):
            parts.xb.append(embedder.embed(batch.pixels))
        _embed_pairs(batch, embedder, parts)
        if regions is not None:
            _embed_cropped(batch, embedder, regions, keep_pixels, parts)
    if aligned is not None:
        _embed_aligned(batch, embedder, aligned, parts)


def _embed_pooled(batch: DecodedBatch, embedder: Embedder, regions: RegionSpec, parts: _Parts) -> None:
    """Mode "pool": every box from one pass; box 0 (the whole image) is the global vector."""
    if len(batch.pixels):
        boxed = embedder.embed_boxes(batch.pixels, regions.boxes)  # (b, R, d)
        parts.xb.append(np.ascontiguousarray(boxed[:, 0]))
        parts.regions.append(boxed)


def _embed_cropped(
    batch: DecodedBatch, embedder: Embedder, regions: RegionSpec, keep_pixels: bool, parts: _Parts
) -> None:
    """Mode "crop": every box cut from the batch's ``region_pixels`` and embedded on its own; mode "rmac":
    every box pooled from one pass over them."""
    if not len(batch.pixels):
        return
    if batch.region_pixels is None or len(batch.region_pixels) != len(batch.pixels):
        raise ValueError(f"regions in mode {regions.mode!r} need the decode step's region_pixels")
    if regions.mode == "rmac":
        parts.regions.append(embedder.embed_boxes(batch.region_pixels, regions.boxes))
    else:
        parts.regions.append(embedder.embed_crops(batch.region_pixels, regions.boxes))
    if keep_pixels:
        parts.pixels.append(batch.region_pixels)


def _embed_pairs(batch: DecodedBatch, embedder: Embedder, parts: _Parts) -> None:
    """The augmented copies of the batch (learned whitening), with the rows they copy."""
    if batch.pair_pixels is not None and len(batch.pair_pixels):
        parts.x_pair.append(embedder.embed(batch.pair_pixels))
        parts.pair_rows.append(batch.pair_rows)


def _embed_aligned(batch: DecodedBatch, embedder: Embedder, aligned: RegionSpec, parts: _Parts) -> None:
    """The region index's own boxes, pooled or cropped like the index made them."""
    if not len(batch.pixels):
        return
    if aligned.mode == "pool":
        parts.aligned.append(embedder.embed_boxes(batch.pixels, aligned.boxes))
    elif batch.region_pixels is None or batch.region_pixels.shape[-1] != aligned.size:
        raise ValueError("cropped aligned boxes need region_pixels at their size")
    else:
        parts.aligned.append(embedder.embed_crops(batch.region_pixels, aligned.boxes))


def _concat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """The arrays concatenated along axis 0, or an empty array of ``empty_shape`` when there are none."""
    return np.concatenate(arrays) if arrays else np.zeros(empty_shape, dtype)


def _finish(
    parts: _Parts,
    dim: int,
    regions: RegionSpec | None,
    aligned: RegionSpec | None,
    keep_pixels: bool,
) -> EmbeddedSource:
    """The collected parts as one EmbeddedSource; empty arrays of the right shapes where nothing came."""
    xb = _concat(parts.xb, (0, dim), np.float32)
    result = EmbeddedSource(
        xb,
        parts.records,
        parts.rejections,
        decode_seconds=parts.wait_seconds,
        embed_seconds=parts.embed_seconds,
        decode_task_seconds=parts.task_seconds,
        decode_task_cpu_seconds=parts.task_cpu_seconds,
        pair_errors=parts.pair_errors,
    )
    if parts.x_pair:
        result.x_pair = np.concatenate(parts.x_pair)
        result.pair_rows = np.concatenate(parts.pair_rows)
    if aligned is not None:
        result.x_aligned = _concat(parts.aligned, (0, len(aligned.boxes), xb.shape[1]), np.float32)
    if keep_pixels:
        result.region_pixels = _concat(parts.pixels, (0, 3, regions.size, regions.size), np.uint8)
    if regions is not None:
        result.x_regions = _concat(parts.regions, (0, len(regions.boxes), xb.shape[1]), np.float32)
    return result


def metadata_table(records: list[dict[str, Any]]) -> pa.Table:
    rows = [{name: rec.get(name) for name in METADATA_SCHEMA.names if name != "row"} for rec in records]
    for i, row in enumerate(rows):
        row["row"] = i
        for name in ("original_width", "original_height"):
            if row[name] is not None and not isinstance(row[name], int):
                try:
                    row[name] = int(row[name])
                except (TypeError, ValueError):
                    row[name] = None
    return pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)


def rejection_counts(rejections: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rej in rejections:
        counts[rej["reason"]] = counts.get(rej["reason"], 0) + 1
    return dict(sorted(counts.items()))


def write_shard_outputs(
    out: str,
    shard: int,
    source_url: str,
    result: EmbeddedSource,
    embedder_fingerprint: str,
    storage_options: storage.StorageOptions | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write vectors (float16), metadata, pairs and region vectors, then the stats marker; return the stats."""
    n = len(result.records)
    if result.xb.shape[0] != n:
        raise ValueError(f"{result.xb.shape[0]} vectors for {n} records")
    t0 = time.perf_counter()
    storage.save_npy(layout.emb_url(out, shard), result.xb.astype(np.float16), storage_options)
    storage.write_parquet(layout.metadata_url(out, shard), metadata_table(result.records), storage_options)
    pairs = _write_pairs(out, shard, result, storage_options)
    region_stats = (
        _write_regions(out, shard, result, storage_options) if result.x_regions is not None else None
    )
    stats = _shard_stats(shard, source_url, result, embedder_fingerprint, pairs, region_stats)
    stats["seconds"]["write"] = round(time.perf_counter() - t0, 3)
    stats["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if extra_stats:
        stats.update(extra_stats)
    # The marker goes last: its presence means every other output of the shard is complete.
    storage.write_json(layout.stats_url(out, shard), stats, storage_options)
    return stats


def _shard_stats(
    shard: int,
    source_url: str,
    result: EmbeddedSource,
    embedder_fingerprint: str,
    pairs: int,
    region_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """A shard's stats marker, less the write time and ``finished_at`` (``write_shard_outputs`` adds them)."""
    n = len(result.records)
    first_id = int(layout.pack_ids(shard, np.zeros(1, dtype=np.int64))[0])
    return {
        "shard": shard,
        "source": source_url,
        "count": n,
        "dim": int(result.xb.shape[1]),
        "dtype": "float16",
        "embedder_fingerprint": embedder_fingerprint,
        "samples": n + len(result.rejections),
        "rejected": len(result.rejections),
        "rejected_by_reason": rejection_counts(result.rejections),
        "rejections": result.rejections,
        "metadata_errors": sum(1 for r in result.records if r.get("metadata_error")),
        "pairs": pairs,
        "pair_errors": result.pair_errors,
        "id_range": [first_id, first_id + n],  # half-open
        "regions": region_stats,
        "seconds": {
            "decode_wait": round(result.decode_seconds, 3),
            "embed": round(result.embed_seconds, 3),
            "decode_task": round(result.decode_task_seconds, 3),
            "decode_task_cpu": round(result.decode_task_cpu_seconds, 3),
        },
    }


def _write_pairs(
    out: str, shard: int, result: EmbeddedSource, storage_options: storage.StorageOptions | None
) -> int:
    """The augmented copies' vectors ((m, d) float16) and rows ((m,) int32), if any; returns m."""
    pairs = 0 if result.x_pair is None else len(result.x_pair)
    if pairs:
        storage.save_npz(
            layout.pairs_url(out, shard),
            storage_options,
            rows=result.pair_rows.astype(np.int32),
            x=result.x_pair.astype(np.float16),
        )
    return pairs


def _write_regions(
    out: str, shard: int, result: EmbeddedSource, storage_options: storage.StorageOptions | None
) -> dict[str, Any]:
    """Region vectors of a shard in the region index's own embedding layout (``layout.regions_root``):
    (n · R, d) float16, row ``i · R + r`` for box r of image i. (The region index takes the index's
    whitening: no augmented pairs of its own.)"""
    n, n_boxes, dim = result.x_regions.shape
    if n != len(result.records):
        raise ValueError(f"{n} region rows for {len(result.records)} records")
    root = layout.regions_root(out)
    storage.save_npy(
        layout.emb_url(root, shard),
        result.x_regions.reshape(n * n_boxes, dim).astype(np.float16),
        storage_options,
    )
    first_id = int(layout.pack_ids(shard, np.zeros(1, dtype=np.int64))[0])
    return {
        "per_image": n_boxes,
        "count": n * n_boxes,
        "id_range": [first_id, first_id + n * n_boxes],
    }


def finished_shards(
    out: str, storage_options: storage.StorageOptions | None = None
) -> dict[int, dict[str, Any]]:
    """Stats of every shard whose marker exists, by shard id (one listing, then one read per marker)."""
    done: dict[int, dict[str, Any]] = {}
    for url in storage.list_files(layout.stats_dir(out), storage_options):
        shard = layout.shard_of_stats_name(url)
        if shard is not None and not url.rsplit("/", 1)[-1].startswith("."):
            done[shard] = storage.read_json(url, storage_options)
    return done


def embed_shard(
    out: str,
    shard: int,
    url: str,
    embedder: Embedder,
    batch_size: int = 64,
    limits: DecodeLimits = DecodeLimits(),
    pairs: PairSpec | None = None,
    regions: RegionSpec | None = None,
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """Embed tar shard ``url`` in this process and write its outputs as shard ``shard`` of ``out``.

    Returns its stats. The arguments are those of ``EmbedWorker.embed_shard`` (its Ray twin, whose actor
    holds the embedder), in the order of ``write_shard_outputs``.
    """
    t0 = time.perf_counter()
    region_spec = regions.preprocess_spec(embedder.spec["preprocess"]) if regions is not None else None
    batches = decode_samples(
        iter_tar(url, storage_options),
        embedder.preprocess,
        batch_size,
        limits,
        embedder.image_size,
        pairs,
        make_preprocess(region_spec) if region_spec else None,
    )
    result = embed_batches(batches, embedder, regions)
    return write_shard_outputs(
        out,
        shard,
        url,
        result,
        embedder.fingerprint,
        storage_options,
        {"wall_seconds": round(time.perf_counter() - t0, 3)},
    )
