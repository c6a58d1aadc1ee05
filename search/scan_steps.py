"""A query chunk's path through the scan: embed → search → (regions, verify) → write, one step each.

- ``EmbedStep`` submits a chunk to an embedding actor (its queries decoded and embedded, with the windows,
  aligned boxes and pixels region matching needs) → an ``EmbeddedSource``;
- ``SearchStep`` searches the chunk's queries in the global index: top k merged from every scan actor,
  score-normalised (``score_norm``), and with a radius every further match above it;
- ``RegionsStep`` searches their windows in the region index (``copyscan.search.regions``): local matches per
  training image, crops of the frames searched back in the global index, split scores;
- ``WriteStep`` writes the chunk (``copyscan.search.results.write.write_chunk``): here, or handed to the Ray
  tasks that verify its matches first;
- ``ChunkScan`` runs search → regions → write on each embedded chunk and lists the chunks that failed.

The steps import no Ray: the Ray layer (``search/scan_ray.py``) hands them their Ray-backed collaborators
(the fan-outs over the scan actors, an embedding actor, the verified-writes tasks) and schedules them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.embed.stage import EmbeddedSource
from copyscan.indexing.models.regions import RegionSpec
from copyscan.indexing.runtime.progress import Progress
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.radius import Above, keep_above, radius_counts
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.result import LocalResult
from copyscan.search.regions.windows import LocalWindows, RegionIndex
from copyscan.search.results.write import write_chunk
from copyscan.search.scan import ScanSetup
from copyscan.search.scan_chunks import QueryChunk

logger = logging.getLogger("copyscan")

# embed_crops(pixels (n, 3, S, S) uint8, boxes (n, m, 4) float32 fractions, NaN = none) → (n, m, d) float32:
# the crops embedded by the actor that embedded the chunk (its ``embed_crops_each``)
CropEmbedder = Callable[[np.ndarray, np.ndarray], np.ndarray]
Failures = list[tuple[QueryChunk, str]]  # chunks that failed for good, with the error


class Index(Protocol):
    """The global index as the scan searches it (``copyscan.search.scan_ray.Fanout`` over the scan actors)."""

    def search(self, xq: np.ndarray, above: Above | None = None) -> ShardResult:
        """xq: (nq, d) float32 raw descriptors → the merged top k (+ matches above ``above.lo``)."""
        ...


@dataclass(frozen=True)
class EmbedStep:
    """Submits a query chunk to an embedding actor (run_pool's ``submit``) → a reference to its
    ``EmbeddedSource``: vectors xb (n, d), records, rejections, and with region matching the window vectors,
    aligned box vectors and (``crops``) the pixels the windows were cut from."""

    batch_size: int
    limits: DecodeLimits
    windows: RegionSpec | None = None
    aligned: RegionSpec | None = None
    crops: bool = False  # keep the pixels: crops (frames, sliding windows) are cut from them later
    draft: bool = False  # JPEGs decoded at a reduced DCT scale that still covers the model's input

    @classmethod
    def of(cls, setup: ScanSetup) -> EmbedStep:
        local = setup.local
        cfg = setup.cfg
        if local is None:
            return cls(cfg.batch_size, setup.limits, draft=cfg.jpeg_draft)
        return cls(cfg.batch_size, setup.limits, local.spec, local.aligned, local.crops, cfg.jpeg_draft)

    def __call__(self, actor: Any, chunk: QueryChunk) -> Any:
        rest = (
            self.batch_size,
            self.limits,
            self.windows,
            self.aligned,
            self.crops,
            chunk.describe(),
            self.draft,
        )
        if chunk.kind == "tar":
            return actor.embed_tar.remote(chunk.urls[0], *rest)
        return actor.embed_images.remote(chunk.urls, chunk.keys, *rest)


@dataclass(frozen=True)
class SearchStep:
    """The global index searched with a chunk's queries, or crops of them, and the hits score-normalised."""

    index: Index
    normalise: ScoreNormaliser
    k: int
    radius: dict[str, Any] | None = None  # every match with score_norm >= radius["value"]; None: top k
    radius_max: int = 1000
    radius_margin: float = 0.1

    def top_k(self, x: np.ndarray) -> ShardResult:
        """x: (n, d) raw descriptors (queries, or crops of them) → merged top k with D_norm (score_norm)."""
        hits = self.index.search(x)
        return replace(hits, D_norm=self.normalise(x, hits.D, hits.I))

    def queries(self, xq: np.ndarray) -> tuple[ShardResult, dict[str, int] | None]:
        """The chunk's own queries xq (nq, d): ``top_k``, and with ``radius`` every further match of
        score_norm >= radius (search/ann/radius.py) with the counts for the chunk marker (else None)."""
        if self.radius is None:
            return self.top_k(xq), None
        above = Above(self.radius["value"] + self.normalise.floor(xq), self.radius_max, self.radius_margin)
        hits = self.index.search(xq, above)
        hits = replace(hits, D_norm=self.normalise(xq, hits.D, hits.I))
        hits = keep_above(hits, self.k, self.radius["value"])
        return hits, radius_counts(hits, self.k, above)


@dataclass(frozen=True)
class RegionsStep:
    """Region matching of a chunk: its query windows searched in the region index (``index``), crops of the
    frames (and sliding windows) searched in the global index (``search``), the split product."""

    windows: LocalWindows
    index: RegionIndex
    search: SearchStep

    def __call__(
        self,
        embedded: EmbeddedSource,
        records: list[dict[str, Any]],
        result: ShardResult,
        embed_crops: CropEmbedder,
    ) -> tuple[ShardResult, LocalResult]:
        """The chunk's local matches, and ``result`` (its global matches) with their split scores when the
        scan asks for them. Drops the chunk's pixels once the crops are cut."""
        windows = self.windows
        local = windows.search(embedded.x_regions, self.index, embedded.region_pixels, embed_crops)
        if windows.crops:  # the query crops are embedded by the actor that embedded the chunk
            sizes = [(r["width"], r["height"]) for r in records]
            local = windows.refine_result(
                local, embedded.region_pixels, embed_crops, self.search.top_k, sizes
            )
            embedded.region_pixels = None  # (n, 3, S, S) uint8: not held while the chunk is written
        if windows.aligned is not None:
            result = replace(result, split=windows.split_scores(embedded.x_aligned, result.I, self.index))
            local = replace(local, split=windows.split_scores(embedded.x_aligned, local.I, self.index))
        return result, local


def chunk_written(progress: Progress, marker: dict[str, Any]) -> None:
    """Count a written chunk (its marker) in the scan's progress."""
    progress.update(1, marker["queries"])


@dataclass(frozen=True)
class WriteStep:
    """Writes a chunk's vectors, matches and marker (``write_chunk``) here, or, when the scan verifies, hands
    its arguments to ``verified`` (Ray tasks that verify the matches, then write: ``scan_writes_ray.VerifiedWrites``,
    which report each written marker to ``written`` themselves)."""

    out: str
    storage_options: dict[str, Any]
    threshold: dict[str, Any] | None
    partial_threshold: dict[str, Any] | None
    written: Callable[[dict[str, Any]], None]  # each written chunk's marker (progress)
    verified: Callable[[QueryChunk, dict[str, Any]], None] | None = None

    @classmethod
    def of(
        cls,
        setup: ScanSetup,
        written: Callable[[dict[str, Any]], None],
        verified: Callable[[QueryChunk, dict[str, Any]], None] | None = None,
    ) -> WriteStep:
        cfg = setup.cfg
        return cls(cfg.out, cfg.storage_options, setup.threshold, setup.partial_threshold, written, verified)

    def __call__(
        self,
        chunk: QueryChunk,
        embedded: EmbeddedSource,
        records: list[dict[str, Any]],
        result: ShardResult,
        local: LocalResult | None,
        marker: dict[str, Any],
    ) -> None:
        """Write ``chunk``: its query vectors ``embedded.xb`` (n, d), ``records``, rejections, matches
        (``result``, ``local``) and, last, ``marker`` with its counts."""
        args = {
            "out": self.out,
            "chunk": chunk.chunk,
            "xq": embedded.xb,
            "records": records,
            "rejections": embedded.rejections,
            "result": result,
            "marker": marker,
            "storage_options": self.storage_options,
            "threshold": self.threshold,
            "local": local,
            "partial_threshold": self.partial_threshold,
        }
        if self.verified is None:
            self.written(write_chunk(**args))
        else:  # verified, then written, by a Ray task; progress when it is done
            self.verified(chunk, args)


def query_records(chunk: QueryChunk, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunk's query records as written: a tar chunk's queries have their shard as ``url`` (the sample's
    JSON url, if any, is not where its bytes are): what pixel verification and reports re-read them from,
    with query_id as the key."""
    if chunk.kind != "tar":
        return records
    return [{**r, "url": chunk.urls[0]} for r in records]


def no_matches(k: int) -> ShardResult:
    """The result of a chunk with no query embedded: (0, k) arrays."""
    empty = np.zeros((0, k), dtype=np.float32)
    return ShardResult(empty, empty.astype(np.int64), empty, {}, empty)


@dataclass
class ChunkScan:
    """A query chunk's path once embedded (run_pool's ``on_result``): search → regions → write. A chunk that
    raises one of ``errors`` is logged and listed in ``failed``; the scan goes on with the others."""

    search: SearchStep
    regions: RegionsStep | None
    write: WriteStep
    build_id: str  # the index build the chunk's marker names (resume refuses another build's chunks)
    errors: tuple[type[BaseException], ...]
    failed: Failures = field(default_factory=list)

    def __call__(self, chunk: QueryChunk, embedded: EmbeddedSource, embed_crops: CropEmbedder) -> None:
        started = time.perf_counter()
        records = query_records(chunk, embedded.records)
        try:
            result, local, radius = self.find(embedded, records, embed_crops)
            marker = {
                "source": chunk.describe(),
                "index_build_id": self.build_id,
                "search_seconds": round(time.perf_counter() - started, 3),
                "embed_seconds": round(embedded.embed_seconds, 3),
                "decode_wait_seconds": round(embedded.decode_seconds, 3),
                "radius": radius,  # None: top k only
            }
            self.write(chunk, embedded, records, result, local, marker)
        except self.errors as exc:
            logger.error("%s failed: %s", chunk.describe(), exc)
            self.failed.append((chunk, f"{type(exc).__name__}: {exc}"))

    def find(
        self, embedded: EmbeddedSource, records: list[dict[str, Any]], embed_crops: CropEmbedder
    ) -> tuple[ShardResult, LocalResult | None, dict[str, int] | None]:
        """The chunk's global matches, local matches (None without region matching) and radius counts."""
        if not len(records):
            return no_matches(self.search.k), None, None
        result, radius = self.search.queries(embedded.xb)
        local = None
        if self.regions is not None:
            result, local = self.regions(embedded, records, result, embed_crops)
        return result, local, radius
