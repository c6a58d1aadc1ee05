"""Pixel verification of scan matches: Carlini et al.'s (ℓ2, δ)-extraction test on re-fetched originals.

For the matches of rank < ``ranks``, the training image is re-read from the index's source shard by its
key and the generation from its query source (``indexing.read.fetch``: one streamed read per tar, all sources
in parallel threads), both are decoded and aligned (``search.verify.pixel``), and ``pixel_l2``, ``tiled_l2`` and
``extracted`` (``tiled_l2 < delta``) are set. A pair that cannot be verified keeps null distances and gets
a reason in ``verify_error`` (``train_key_not_found``, ``query_truncated``, ``train_no_source``, ...):
nothing is dropped, and the counts go into the chunk marker and ``summary.json``. Matches not selected
for verification keep null in all four columns.

Density-relative score (Carlini et al., for unconditional models; opt-in, ``neighbours`` > 0):
``density_l2 = pixel_l2 / (alpha · mean pixel_l2 of the generation to its nearest training images)``,
extracted when < 1. The paper takes the 50 nearest by pixel ℓ2 over the whole training set; here they
are the query's own top ``neighbours`` scan matches (nearest by descriptor), which are fetched and
compared too, so the scan must keep k >= ``neighbours`` matches per query. Neighbours that cannot be
compared are left out of the mean (counted in ``neighbour_failed``).

Images are fetched for at most ``fetch_pairs`` pairs (whole queries) at a time and decoded ``batch`` pairs
at a time in a thread pool (PIL's decode and torch's resize release the GIL), so memory stays bounded
by those whatever the number of matches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.embed.decode import DecodeLimits
from indexing.read.fetch import fetch_images, training_source
from indexing.store import storage
from search.results.matches import with_columns
from search.verify.pixel import (
    DEFAULT_SIZE,
    DEFAULT_TILES,
    EXTRACTION_DELTA,
    FITS,
    decode_fetched,
    density_relative,
    pixel_distances,
)

VERIFY_FIELDS = (
    pa.field("pixel_l2", pa.float32()),
    pa.field("tiled_l2", pa.float32()),
    pa.field("extracted", pa.bool_()),
    pa.field("verify_error", pa.string()),
    pa.field("density_l2", pa.float32()),
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
    # density-relative score (``density_l2``): pixel l2 over alpha x the mean pixel l2 to the query's top
    # ``neighbours`` matches, which are then fetched and compared too; 0 = off
    neighbours: int = 0
    alpha: float = 0.5
    fetch_pairs: int = (
        4096  # pairs whose images are fetched and held at once (whole queries), bounding memory
    )

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
        if self.neighbours < 0 or self.alpha <= 0:
            out.append("density_neighbours must be >= 0 and density_alpha positive")
        return out


@dataclass(frozen=True)
class MatchVerifier:
    """A verification bound to one index: a picklable ``table -> (table, counts)`` that can travel to the
    Ray tasks that verify scan chunks (put it in the object store once; the manifest can be large).
    ``verify`` is ``verify_matches`` (pixels, with a VerifySpec) or ``search.verify.dense.verify_dense`` (with a
    DenseSpec)."""

    manifest: dict[str, Any]
    index_url: str
    spec: Any
    storage_options: storage.StorageOptions | None = None
    verify: Callable[..., tuple[pa.Table, dict[str, Any]]] | None = None  # None: verify_matches

    def __call__(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        verify = self.verify or verify_matches
        return verify(table, self.manifest, self.index_url, self.spec, self.storage_options)


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
    With ``spec.neighbours`` (density-relative score, module docstring), also ``density_l2`` and the
    counts ``density_scored``, ``density_extracted`` (< 1), ``neighbour_pairs`` and ``neighbour_failed``.
    """
    t0 = time.perf_counter()
    n = table.num_rows
    l2 = np.full(n, np.nan, dtype=np.float32)
    tiled = np.full(n, np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * n
    rank = np.asarray(table["rank"].to_numpy(zero_copy_only=False), dtype=np.float64)  # NaN: no global rank
    selected = rank < spec.ranks
    rows = np.nonzero(rank < max(spec.ranks, spec.neighbours))[0]  # selected, and density neighbours
    stats: dict[str, Any] = {"verify_pairs": int(selected.sum())}
    examples: list[dict[str, Any]] = []
    timings = {"fetch": 0.0, "decode": 0.0, "distance": 0.0}
    if len(rows):
        train_req, query_req = pair_requests(table, rows, manifest, index_url)
        with ThreadPoolExecutor(max_workers=max(1, spec.threads)) as pool:
            for group in query_groups(rows.tolist(), query_req, spec.fetch_pairs):
                t = time.perf_counter()
                fetched = fetch_images(
                    [*(train_req[r] for r in group), *(query_req[r] for r in group)],
                    storage_options,
                    spec.threads,
                )
                timings["fetch"] += time.perf_counter() - t
                # pairs sharing an image sit in one batch, so it is decoded once: the training image, or
                # with density neighbours (many training images per query) the generation
                if spec.neighbours:
                    ordered = sorted(group, key=lambda r: (str(query_req[r]), str(train_req[r]), r))
                else:
                    ordered = sorted(group, key=lambda r: (str(train_req[r][0]), train_req[r][1], r))
                for start in range(0, len(ordered), spec.batch):
                    batch = ordered[start : start + spec.batch]
                    t = time.perf_counter()
                    wanted = sorted({train_req[r] for r in batch} | {query_req[r] for r in batch}, key=str)
                    decoded = dict(
                        zip(
                            wanted,
                            pool.map(
                                lambda q, got=fetched: decode_fetched(
                                    got[q], spec.size, spec.fit, spec.limits
                                ),
                                wanted,
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
                                if selected[r]:  # a density neighbour only: counted, not reported
                                    errors[r] = f"{side}_{result[0]}"
                                    if len(examples) < EXAMPLES_KEPT:
                                        examples.append(
                                            error_example(train_req[r], query_req[r], errors[r], result[1])
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
                del fetched
    done = np.isfinite(tiled) & selected
    extracted = done & (tiled < spec.delta)
    columns = {
        "pixel_l2": pa.array(l2, pa.float32(), mask=~done),
        "tiled_l2": pa.array(tiled, pa.float32(), mask=~done),
        "extracted": pa.array(extracted, pa.bool_(), mask=~done),
        "verify_error": pa.array(errors, pa.string()),
    }
    if spec.neighbours:
        density = _density(table, rank, l2, done, spec)
        columns["density_l2"] = pa.array(density, pa.float32(), mask=np.isnan(density))
        neighbours = rank < spec.neighbours
        stats.update(
            {
                "density_scored": int(np.isfinite(density).sum()),
                "density_extracted": int((density < 1).sum()),
                "neighbour_pairs": int(neighbours.sum()),
                "neighbour_failed": int((neighbours & ~np.isfinite(l2)).sum()),
            }
        )
    table = with_columns(table, columns)
    query_col = table["query_id"].to_numpy(zero_copy_only=False)
    stats.update(
        {
            "verified": int(done.sum()),
            "extracted": int(extracted.sum()),
            "extracted_queries": len(set(query_col[extracted].tolist())),
            "verify_errors": count_reasons(errors),
            "verify_error_examples": examples,
            "verify_seconds": {k: round(v, 3) for k, v in timings.items()}
            | {"total": round(time.perf_counter() - t0, 3)},
        }
    )
    return table, stats


def pair_requests(
    table: pa.Table, rows: np.ndarray, manifest: dict[str, Any], index_url: str
) -> tuple[dict[int, tuple[str, str]], dict[int, tuple[str, str]]]:
    """The images to fetch for ``rows`` of ``table`` (MATCHES_SCHEMA columns), as ``indexing.read.fetch``
    requests: {row: (the training shard's source tar, train_key)} and {row: (query_source, query_id)}."""
    shards = table["embedding_shard"].to_numpy(zero_copy_only=False)
    train_keys = table["train_key"].to_pylist()
    query_ids = table["query_id"].to_pylist()
    query_sources = table["query_source"].to_pylist()
    sources = {int(s): training_source(manifest, index_url, int(s)) for s in np.unique(shards[rows])}
    train_req = {int(r): (sources[int(shards[r])], train_keys[r]) for r in rows}
    query_req = {int(r): (query_sources[r], query_ids[r]) for r in rows}
    return train_req, query_req


def error_example(
    train_req: tuple[str, str], query_req: tuple[str, str], reason: str, detail: str
) -> dict[str, str]:
    """One failed pair as listed in a chunk marker (at most EXAMPLES_KEPT per chunk)."""
    return {"query_id": query_req[1], "train_key": train_req[1], "reason": reason, "detail": detail[:300]}


def count_reasons(errors: list[str | None]) -> dict[str, int]:
    """{reason: rows} of the rows that could not be verified (None: verified or not selected)."""
    counts: dict[str, int] = {}
    for reason in errors:
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


def query_groups(rows: list[int], query_of: dict[int, Any], max_pairs: int) -> list[list[int]]:
    """``rows`` cut into groups of whole queries, each of at most ``max_pairs`` rows (unless one query
    alone has more)."""
    by_query: dict[Any, list[int]] = {}
    for r in rows:
        by_query.setdefault(query_of[r], []).append(r)
    groups: list[list[int]] = []
    current: list[int] = []
    for query_rows in by_query.values():
        if current and len(current) + len(query_rows) > max_pairs:
            groups.append(current)
            current = []
        current += query_rows
    if current:
        groups.append(current)
    return groups


def _density(
    table: pa.Table, rank: np.ndarray, l2: np.ndarray, done: np.ndarray, spec: VerifySpec
) -> np.ndarray:
    """(n,) float32 density-relative score of the verified rows (NaN elsewhere), by
    ``search.verify.pixel.density_relative``; a query's neighbours are its rows of rank < ``spec.neighbours``
    whose pixel l2 is known."""
    sources = table["query_source"].to_pylist()
    ids = table["query_id"].to_pylist()
    neighbour_l2: dict[tuple[Any, Any], list[float]] = {}
    for r in np.nonzero((rank < spec.neighbours) & np.isfinite(l2))[0]:
        neighbour_l2.setdefault((sources[r], ids[r]), []).append(float(l2[r]))
    out = np.full(len(l2), np.nan, dtype=np.float32)
    rows = np.nonzero(done)[0]
    if len(rows):
        out[rows] = density_relative(
            l2[rows], [np.asarray(neighbour_l2.get((sources[r], ids[r]), [])) for r in rows], spec.alpha
        )
    return out
