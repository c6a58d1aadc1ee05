"""Pixel verification of scan matches: Carlini et al.'s (ℓ2, δ)-extraction test on re-fetched originals.

For the matches of rank < ``ranks``, the training image is re-read from the index's source shard by its
key and the generation from its query source (``search.fetch``: one streamed read per tar, all sources
in parallel threads), both are decoded and aligned (``search.pixel``), and ``pixel_l2``, ``tiled_l2`` and
``extracted`` (``tiled_l2 < delta``) are set. A pair that cannot be verified keeps null distances and gets
a reason in ``verify_error`` (``train_key_not_found``, ``query_truncated``, ``train_no_source``, ...):
nothing is dropped, and the counts go into the chunk marker and ``summary.json``. Matches not selected
for verification keep null in all four columns.

Decoding runs ``batch`` pairs at a time in a thread pool (PIL releases the GIL while decoding and
resizing), so memory stays at about ``2 · batch · size² · 3`` bytes whatever the number of matches.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from indexing import storage
from indexing.decode import DecodeLimits
from search.fetch import fetch_images, training_source
from search.pixel import DEFAULT_SIZE, DEFAULT_TILES, EXTRACTION_DELTA, FITS, decode_fetched, pixel_distances

VERIFY_FIELDS = (
    pa.field("pixel_l2", pa.float32()),
    pa.field("tiled_l2", pa.float32()),
    pa.field("extracted", pa.bool_()),
    pa.field("verify_error", pa.string()),
)
EXAMPLES_KEPT = 5  # failed pairs listed (with details) per chunk marker


@dataclass(frozen=True)
class VerifySpec:
    """What to verify and how: ranks < ``ranks`` of every query; images aligned to ``size`` px."""

    ranks: int = 1
    size: int = DEFAULT_SIZE
    tiles: int = DEFAULT_TILES
    delta: float = EXTRACTION_DELTA
    fit: str = "crop"
    threads: int = 8
    batch: int = 64
    limits: DecodeLimits = DecodeLimits()

    def problems(self) -> list[str]:
        out = []
        if self.ranks < 0:
            out.append("verify_pixels must be >= 0")
        if self.size <= 0 or self.tiles <= 0 or self.size % self.tiles:
            out.append(
                f"verify_size ({self.size}) must be a positive multiple of verify_tiles ({self.tiles})"
            )
        if not 0 < self.delta:
            out.append("extraction_delta must be positive")
        if self.fit not in FITS:
            out.append(f"verify_fit must be one of {', '.join(FITS)}, not {self.fit!r}")
        return out


@dataclass(frozen=True)
class MatchVerifier:
    """``verify_matches`` bound to one index: a picklable ``table -> (table, counts)`` that can travel to
    the Ray tasks that verify scan chunks (put it in the object store once; the manifest can be large)."""

    manifest: dict[str, Any]
    index_url: str
    spec: VerifySpec
    storage_options: storage.StorageOptions | None = None

    def __call__(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        return verify_matches(table, self.manifest, self.index_url, self.spec, self.storage_options)


def with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """``table`` with ``columns`` replaced (or appended when absent)."""
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    return table


def verify_matches(
    table: pa.Table,
    manifest: dict[str, Any],
    index_url: str,
    spec: VerifySpec,
    storage_options: storage.StorageOptions | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Verify the matches of rank < ``spec.ranks`` in ``table`` (MATCHES_SCHEMA columns).

    Returns the table with ``pixel_l2``, ``tiled_l2`` (float32), ``extracted`` (bool) and
    ``verify_error`` (str) set, and counts: ``verify_pairs`` (selected), ``verified``, ``extracted``,
    ``extracted_queries``, ``verify_errors`` ({reason: count}), ``verify_error_examples``, timings.
    """
    t0 = time.perf_counter()
    n = table.num_rows
    l2 = np.full(n, np.nan, dtype=np.float32)
    tiled = np.full(n, np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * n
    rows = np.nonzero(np.asarray(table["rank"].to_numpy(zero_copy_only=False)) < spec.ranks)[0]
    stats: dict[str, Any] = {"verify_pairs": len(rows)}
    examples: list[dict[str, Any]] = []
    timings = {"fetch": 0.0, "decode": 0.0, "distance": 0.0}
    if len(rows):
        shards = table["embedding_shard"].to_numpy(zero_copy_only=False)
        train_keys = table["train_key"].to_pylist()
        query_ids = table["query_id"].to_pylist()
        query_sources = table["query_source"].to_pylist()
        sources = {int(s): training_source(manifest, index_url, int(s)) for s in np.unique(shards[rows])}
        train_req = {int(r): (sources[int(shards[r])], train_keys[r]) for r in rows}
        query_req = {int(r): (query_sources[r], query_ids[r]) for r in rows}
        t = time.perf_counter()
        fetched = fetch_images([*train_req.values(), *query_req.values()], storage_options, spec.threads)
        timings["fetch"] = time.perf_counter() - t
        # pairs sharing a training image sit in one batch, so it is decoded once
        ordered = sorted(rows.tolist(), key=lambda r: (str(train_req[r][0]), train_req[r][1], r))
        with ThreadPoolExecutor(max_workers=max(1, spec.threads)) as pool:
            for start in range(0, len(ordered), spec.batch):
                batch = ordered[start : start + spec.batch]
                t = time.perf_counter()
                wanted = sorted({train_req[r] for r in batch} | {query_req[r] for r in batch}, key=str)
                decoded = dict(
                    zip(
                        wanted,
                        pool.map(
                            lambda q: decode_fetched(fetched[q], spec.size, spec.fit, spec.limits), wanted
                        ),
                        strict=True,
                    )
                )
                timings["decode"] += time.perf_counter() - t
                ok = []
                for r in batch:
                    for side, req in (("train", train_req[r]), ("query", query_req[r])):
                        result = decoded[req]
                        if isinstance(result, tuple):
                            errors[r] = f"{side}_{result[0]}"
                            if len(examples) < EXAMPLES_KEPT:
                                examples.append(
                                    {
                                        "query_id": query_ids[r],
                                        "train_key": train_keys[r],
                                        "reason": errors[r],
                                        "detail": result[1][:300],
                                    }
                                )
                            break
                    else:
                        ok.append(r)
                if ok:
                    t = time.perf_counter()
                    a = np.stack([decoded[train_req[r]] for r in ok])
                    b = np.stack([decoded[query_req[r]] for r in ok])
                    l2[ok], tiled[ok] = pixel_distances(a, b, spec.tiles)
                    timings["distance"] += time.perf_counter() - t
    done = np.isfinite(tiled)
    extracted = done & (tiled < spec.delta)
    table = with_columns(
        table,
        {
            "pixel_l2": pa.array(l2, pa.float32(), mask=~done),
            "tiled_l2": pa.array(tiled, pa.float32(), mask=~done),
            "extracted": pa.array(extracted, pa.bool_(), mask=~done),
            "verify_error": pa.array(errors, pa.string()),
        },
    )
    by_reason: dict[str, int] = {}
    for reason in errors:
        if reason is not None:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    query_col = table["query_id"].to_numpy(zero_copy_only=False)
    stats.update(
        {
            "verified": int(done.sum()),
            "extracted": int(extracted.sum()),
            "extracted_queries": len(set(query_col[extracted].tolist())),
            "verify_errors": dict(sorted(by_reason.items())),
            "verify_error_examples": examples,
            "verify_seconds": {k: round(v, 3) for k, v in timings.items()}
            | {"total": round(time.perf_counter() - t0, 3)},
        }
    )
    return table, stats
