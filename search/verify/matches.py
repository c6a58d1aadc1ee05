"""Pixel verification of scan matches: Carlini et al.'s (ℓ2, δ)-extraction test on re-fetched originals.

For the matches of rank < ``ranks``, the training image is re-read from the index's source shard by its
key and the generation from its query source (``copyscan.indexing.read.fetch``: one streamed read per tar, all
sources in parallel threads), both are decoded and aligned (``copyscan.search.verify.pixel``), and
``pixel_l2``, ``tiled_l2`` and ``extracted`` (``tiled_l2 < delta``) are set. A pair that cannot be verified
keeps null distances and gets a reason in ``verify_error`` (``train_key_not_found``, ``query_truncated``,
``train_no_source``, ...): nothing is dropped, and the counts go into the chunk marker and ``summary.json``.
Matches not selected for verification keep null in all four columns.

Density-relative score (Carlini et al., for unconditional models; opt-in, ``neighbours`` > 0):
``density_l2 = pixel_l2 / (alpha · mean pixel_l2 of the generation to its nearest training images)``,
extracted when < 1. The paper takes the 50 nearest by pixel ℓ2 over the whole training set; here they
are the query's own top ``neighbours`` scan matches (nearest by descriptor), which are fetched and
compared too, so the scan must keep k >= ``neighbours`` matches per query. Neighbours that cannot be
compared are left out of the mean (counted in ``neighbour_failed``).

Images are fetched for at most ``fetch_pairs`` pairs (whole queries) at a time and decoded ``batch`` pairs
at a time in a thread pool (PIL's decode and torch's resize release the GIL), so memory stays bounded
by those whatever the number of matches.

The plumbing this shares with dense verification (``copyscan.search.verify.dense``) lives here: the fetch
requests of a table's pairs (``pair_requests``) cut into groups of whole queries (``query_groups``), their
decoding in a thread pool (``decode_all``), the failures with their reasons and examples (``PairFailures``,
``count_reasons``) and the phase timings of a chunk marker (``timed``, ``seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.read.fetch import Fetched, fetch_images, training_source
from copyscan.indexing.read.ranged import training_ranges
from copyscan.indexing.store import storage
from copyscan.search.results.matches import with_columns
from copyscan.search.verify.pixel import (
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

# a copyscan.indexing.read.fetch request: (source, key); source None when unknown
Request = tuple[str | None, str]
Decoded = TypeVar("Decoded")


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
    ``verify`` is ``verify_matches`` (pixels, with a VerifySpec) or
    ``copyscan.search.verify.dense.verify_dense`` (with a DenseSpec)."""

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
    rank = np.asarray(table["rank"].to_numpy(zero_copy_only=False), dtype=np.float64)  # NaN: no global rank
    selected = rank < spec.ranks
    rows = np.nonzero(rank < max(spec.ranks, spec.neighbours))[0]  # selected, and density neighbours
    run = _PixelRun(table.num_rows, selected, spec)
    if len(rows):
        run.measure(table, rows, manifest, index_url, storage_options)
    done = np.isfinite(run.tiled) & selected
    extracted = done & (run.tiled < spec.delta)
    columns = {
        "pixel_l2": pa.array(run.l2, pa.float32(), mask=~done),
        "tiled_l2": pa.array(run.tiled, pa.float32(), mask=~done),
        "extracted": pa.array(extracted, pa.bool_(), mask=~done),
        "verify_error": pa.array(run.failures.errors, pa.string()),
    }
    stats: dict[str, Any] = {"verify_pairs": int(selected.sum())}
    if spec.neighbours:
        density = _density(table, rank, run.l2, done, spec)
        columns["density_l2"] = pa.array(density, pa.float32(), mask=np.isnan(density))
        stats.update(_density_counts(rank < spec.neighbours, run.l2, density))
    table = with_columns(table, columns)
    query_col = table["query_id"].to_numpy(zero_copy_only=False)
    stats.update(
        {
            "verified": int(done.sum()),
            "extracted": int(extracted.sum()),
            "extracted_queries": len(set(query_col[extracted].tolist())),
            "verify_errors": count_reasons(run.failures.errors),
            "verify_error_examples": run.failures.examples,
            "verify_seconds": seconds(run.timings, t0),
        }
    )
    return table, stats


class _PixelRun:
    """The pixel comparison of one table's pairs: images fetched for a group of whole queries at a time
    (``spec.fetch_pairs`` pairs at most), decoded and compared ``spec.batch`` pairs at a time in a thread pool.

    Fills, per row of the table: ``l2`` and ``tiled`` ((n,) float32, NaN where not measured) and
    ``failures`` (why a selected pair could not be compared)."""

    def __init__(self, n: int, selected: np.ndarray, spec: VerifySpec):
        self.spec = spec
        self.selected = selected  # (n,) bool: rows reported; the others are density neighbours only
        self.l2 = np.full(n, np.nan, dtype=np.float32)
        self.tiled = np.full(n, np.nan, dtype=np.float32)
        self.failures = PairFailures.of(n)
        self.timings = {"fetch": 0.0, "decode": 0.0, "distance": 0.0}
        self.train_req: dict[int, Request] = {}
        self.query_req: dict[int, Request] = {}
        self.ranges: dict[Request, tuple[int, int]] = {}

    def measure(
        self,
        table: pa.Table,
        rows: np.ndarray,
        manifest: dict[str, Any],
        index_url: str,
        storage_options: storage.StorageOptions | None,
    ) -> None:
        """Compare the pairs of ``rows`` ((m,) int64 row numbers of ``table``)."""
        self.train_req, self.query_req = pair_requests(table, rows, manifest, index_url)
        self.ranges = train_ranges(table, rows, self.train_req, index_url, storage_options)
        with ThreadPoolExecutor(max_workers=max(1, self.spec.threads)) as pool:
            for group in query_groups(rows.tolist(), self.query_req, self.spec.fetch_pairs):
                self._group(pool, group, storage_options)

    def _group(
        self, pool: ThreadPoolExecutor, group: list[int], storage_options: storage.StorageOptions | None
    ) -> None:
        """Fetch the images of ``group`` (held until this returns), then compare them batch by batch."""
        with timed(self.timings, "fetch"):
            fetched = fetch_images(
                [*(self.train_req[r] for r in group), *(self.query_req[r] for r in group)],
                storage_options,
                self.spec.threads,
                ranges=self.ranges,
            )
        ordered = self._decode_order(group)
        for start in range(0, len(ordered), self.spec.batch):
            self._batch(pool, fetched, ordered[start : start + self.spec.batch])

    def _decode_order(self, group: list[int]) -> list[int]:
        """``group`` ordered so that pairs sharing an image sit in one batch, where it is decoded once: by
        training image, or with density neighbours (many training images per query) by generation."""
        train_req, query_req = self.train_req, self.query_req
        if self.spec.neighbours:
            return sorted(group, key=lambda r: (str(query_req[r]), str(train_req[r]), r))
        return sorted(group, key=lambda r: (str(train_req[r][0]), train_req[r][1], r))

    def _batch(self, pool: ThreadPoolExecutor, fetched: dict[Request, Fetched], batch: list[int]) -> None:
        """Decode and align the images of ``batch`` (rows), then set the distances of its decoded pairs."""
        spec = self.spec
        with timed(self.timings, "decode"):
            wanted = sorted({self.train_req[r] for r in batch} | {self.query_req[r] for r in batch}, key=str)
            decoded = decode_all(
                pool, wanted, lambda req: decode_fetched(fetched[req], spec.size, spec.fit, spec.limits)
            )
        ok = [r for r in batch if self._both_decoded(r, decoded)]
        if ok:
            with timed(self.timings, "distance"):
                a = np.stack([decoded[self.train_req[r]] for r in ok])
                b = np.stack([decoded[self.query_req[r]] for r in ok])
                self.l2[ok], self.tiled[ok] = pixel_distances(a, b, spec.tiles)

    def _both_decoded(self, r: int, decoded: dict[Request, np.ndarray | tuple[str, str]]) -> bool:
        """Whether both images of row ``r`` decoded; if not, the first failure (training image first) is
        recorded for a selected row (a density neighbour only is counted in ``neighbour_failed``)."""
        for side, req in (("train", self.train_req[r]), ("query", self.query_req[r])):
            result = decoded[req]
            if isinstance(result, tuple):
                if self.selected[r]:
                    self.failures.add(
                        r, f"{side}_{result[0]}", result[1], self.train_req[r], self.query_req[r]
                    )
                return False
        return True


def pair_requests(
    table: pa.Table, rows: np.ndarray, manifest: dict[str, Any], index_url: str
) -> tuple[dict[int, Request], dict[int, Request]]:
    """The images to fetch for ``rows`` of ``table`` (MATCHES_SCHEMA columns), as
    ``copyscan.indexing.read.fetch`` requests: {row: (the training shard's source tar, train_key)} and {row:
    (query_source, query_id)}."""
    shards = table["embedding_shard"].to_numpy(zero_copy_only=False)
    train_keys = table["train_key"].to_pylist()
    query_ids = table["query_id"].to_pylist()
    query_sources = table["query_source"].to_pylist()
    sources = {int(s): training_source(manifest, index_url, int(s)) for s in np.unique(shards[rows])}
    train_req = {int(r): (sources[int(shards[r])], train_keys[r]) for r in rows}
    query_req = {int(r): (query_sources[r], query_ids[r]) for r in rows}
    return train_req, query_req


def train_ranges(
    table: pa.Table,
    rows: np.ndarray,
    train_req: dict[int, Request],
    index_url: str,
    storage_options: storage.StorageOptions | None,
) -> dict[Request, tuple[int, int]]:
    """{training request: (tar offset, size)} of ``rows`` whose place in the source tar the index recorded
    (``copyscan.indexing.read.ranged``): fetched with one ranged read each instead of streaming the tar."""
    if "row" not in table.column_names:
        return {}  # no index rows to look the places up by: streamed
    shards = table["embedding_shard"].to_numpy(zero_copy_only=False)
    index_rows = table["row"].to_numpy(zero_copy_only=False)
    located = {
        int(r): (int(shards[r]), int(index_rows[r]))
        for r in rows
        if train_req[int(r)][0] is not None and not np.isnan(shards[r]) and not np.isnan(index_rows[r])
    }
    by_shard: dict[int, list[int]] = {}
    for shard, row in located.values():
        by_shard.setdefault(shard, []).append(row)
    where = training_ranges(index_url, by_shard, storage_options)
    return {train_req[r]: where[place] for r, place in located.items() if place in where}


def error_example(train_req: Request, query_req: Request, reason: str, detail: str) -> dict[str, str]:
    """One failed pair as listed in a chunk marker (at most EXAMPLES_KEPT per chunk)."""
    return {"query_id": query_req[1], "train_key": train_req[1], "reason": reason, "detail": detail[:300]}


def count_reasons(errors: list[str | None]) -> dict[str, int]:
    """{reason: rows} of the rows that could not be verified (None: verified or not selected)."""
    counts: dict[str, int] = {}
    for reason in errors:
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class PairFailures:
    """Why pairs could not be verified: ``errors``, a reason per row of the table (None: verified or not
    selected), and ``examples``, the first EXAMPLES_KEPT failures with their details."""

    errors: list[str | None]
    examples: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, n: int) -> PairFailures:
        """No failure yet among ``n`` rows."""
        return cls([None] * n)

    def add(self, row: int, reason: str, detail: str, train_req: Request, query_req: Request) -> None:
        """Row ``row`` (the pair ``train_req``, ``query_req``) failed for ``reason``."""
        self.errors[row] = reason
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(error_example(train_req, query_req, reason, detail))


def decode_all(
    pool: ThreadPoolExecutor, wanted: list[Request], decode: Callable[[Request], Decoded]
) -> dict[Request, Decoded]:
    """{request: decode(request)} for each of ``wanted``, decoded in ``pool``'s threads."""
    return dict(zip(wanted, pool.map(decode, wanted), strict=True))


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Add the seconds spent in the ``with`` block to ``timings[phase]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] += time.perf_counter() - t


def seconds(timings: dict[str, float], t0: float) -> dict[str, float]:
    """``timings`` rounded to ms, and the ``total`` since ``t0`` (``time.perf_counter``), as markers list them."""
    return {k: round(v, 3) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 3)}


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


def _density_counts(neighbours: np.ndarray, l2: np.ndarray, density: np.ndarray) -> dict[str, int]:
    """The density-relative counts of a chunk marker; ``neighbours``: (n,) bool, rows of rank < neighbours;
    ``l2``, ``density``: (n,) float32, NaN where unknown."""
    return {
        "density_scored": int(np.isfinite(density).sum()),
        "density_extracted": int((density < 1).sum()),
        "neighbour_pairs": int(neighbours.sum()),
        "neighbour_failed": int((neighbours & ~np.isfinite(l2)).sum()),
    }


def _density(
    table: pa.Table, rank: np.ndarray, l2: np.ndarray, done: np.ndarray, spec: VerifySpec
) -> np.ndarray:
    """(n,) float32 density-relative score of the verified rows (NaN elsewhere), by
    ``copyscan.search.verify.pixel.density_relative``; a query's neighbours are its rows of rank <
    ``spec.neighbours`` whose pixel l2 is known."""
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
