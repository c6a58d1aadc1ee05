"""Region matching in a scan (``LocalWindows``): the query windows searched in the region index, the crops
searched in the global index (localise, then search), and the split product; ``local_windows`` sets it up
from a scan config."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.regions import HYBRID_CROPS, QUERY_SIZE, Box, RegionSpec, parse_slide
from copyscan.indexing.store import layout
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.geometry import REFINE_PAIRS, SLIDE_MAX_AXIS, SLIDE_STEP, slide_boxes
from copyscan.search.regions.result import LocalResult, aggregate, crop_boxes, merge_crops
from copyscan.search.regions.searcher import query_regions, region_manifest


class RegionIndex(Protocol):
    """The region index as the scan searches it (``copyscan.search.scan_ray.Fanout`` over its shards)."""

    def search(self, xq: np.ndarray) -> ShardResult:
        """xq: (n, d) float32 raw descriptors → the merged top hits of every row."""
        ...

    def pair_scores(self, xq: np.ndarray, owner: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(m,) float32 exact scores of the pairs (``xq[owner[i]]``, region ``ids[i]``); NaN for id -1."""
        ...


@dataclass(frozen=True)
class LocalWindows:
    """Region matching in a scan: the query windows and the region index. ``search`` turns a chunk's
    window vectors into a ``LocalResult``; the scan hands it the region index to search in."""

    spec: RegionSpec
    manifest: dict[str, Any]  # the region index's
    train_boxes: list[Box]
    normalise: ScoreNormaliser
    k: int
    density_beta: float = 1.0  # ScanConfig.region_density_beta
    # the region index's own boxes, made like the index made them (split product), or None
    aligned: RegionSpec | None = None
    refine: int = 0  # ScanConfig.region_refine: crops of the best images' frames searched in the global index
    # ScanConfig.region_slide: sliding windows' (width, height), searched like the crops
    slide: tuple[tuple[float, float], ...] = ()
    # region_query_mode=hybrid: the windows (pooled) whose best normalised hits are a query's best ``recrop``
    # are cut out, embedded like images and searched again; their hits replace the pooled windows' ones
    recrop: int = 0

    @property
    def crops(self) -> bool:
        """Whether the scan cuts crops from the queries (frames, sliding windows or re-cropped windows), so
        keeps their pixels."""
        return self.refine > 0 or bool(self.slide) or self.recrop > 0

    def describe(self, hits_per_window: int | None) -> dict[str, Any]:
        """The ``regions`` entry of a scan's summary; ``hits_per_window``: region hits kept per window (None
        when the run searched nothing)."""
        return {
            "windows": len(self.spec.boxes),
            # "rmac": every window pooled from one forward pass at query_size px; "crop": one pass each
            "query_mode": self.spec.mode,
            "query_grid_boxes": [list(b) for b in self.spec.boxes],
            "query_size": self.spec.size,
            # hybrid: the pooled windows with the best hits of a query, cut out and embedded again
            "recrop": self.recrop,
            "regions_per_image": len(self.train_boxes),
            "region_index_vectors": self.manifest["ntotal"],
            "region_index_factory": self.manifest["index"]["factory"],
            "region_hits_per_window": hits_per_window,
            # hits rank by cosine − beta · region density; 0 when off or the index has no densities (built
            # before copyscan stored them: rebuild its region index to get them)
            "region_density_beta": self.density_beta if self.manifest["index"].get("region_density") else 0.0,
            "split_product": self.aligned is not None,
            # the frames of the best `refine` images cut from the query (at query_size px) and searched in
            # the global index; an image's best crop score (crop_score_norm) adds to its local_score_norm
            "refine": self.refine,
            "refine_pairs": REFINE_PAIRS if self.refine else None,
            # windows of these [width, height] (fractions of the query's shorter side), SLIDE_STEP of a side
            # apart, searched in the global index like the frames
            "slide": [list(size) for size in self.slide],
            "slide_step": SLIDE_STEP if self.slide else None,
            "slide_max_per_axis": SLIDE_MAX_AXIS if self.slide else None,
        }

    def search(
        self,
        x_windows: np.ndarray,
        region_index: RegionIndex,
        pixels: np.ndarray | None = None,
        embed: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> LocalResult:
        """x_windows: (nq, W, d) raw window descriptors → the top ``k`` training images of every query.

        With ``recrop`` (hybrid), each query's ``recrop`` windows whose hits score best are cut from
        ``pixels`` (nq, 3, S, S) uint8 and embedded (``embed(pixels, boxes)`` → (nq, m, d), an embed actor's
        ``embed_crops_each``), searched again, and their hits replace those windows' pooled hits."""
        nq, n_windows, dim = x_windows.shape
        hits = self._hits(x_windows.reshape(nq * n_windows, dim), region_index)
        if self.recrop:
            if pixels is None or embed is None or len(pixels) != nq:
                raise ValueError(f"re-cropping windows needs the pixels of all {nq} queries and an embedder")
            chosen = best_windows(hits, nq, n_windows, self.recrop)
            boxes = np.asarray(self.spec.boxes, dtype=np.float32)[chosen]  # (nq, m, 4)
            x = embed(pixels, boxes)
            cropped = self._hits(x.reshape(-1, dim), region_index)
            hits = replace_rows(hits, (np.arange(nq)[:, None] * n_windows + chosen).ravel(), cropped)
        return aggregate(hits, nq, n_windows, self.k, self.spec.boxes, self.train_boxes)

    def _hits(self, x: np.ndarray, region_index: RegionIndex) -> ShardResult:
        """x: (n, d) raw window descriptors → their region hits, score-normalised (``D_norm``)."""
        flat = np.ascontiguousarray(x, dtype=np.float32)
        hits = region_index.search(flat)
        return replace(hits, D_norm=self.normalise(flat, hits.D, hits.I))

    def refine_result(
        self,
        local: LocalResult,
        pixels: np.ndarray,
        embed: Callable[[np.ndarray, np.ndarray], np.ndarray],
        search: Callable[[np.ndarray], ShardResult],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> LocalResult:
        """Localise, then search: cut the frames of every query's best ``refine`` images (``crop_boxes``) and
        its sliding windows (``slide_boxes``; ``sizes``: every query's (width, height) in px, needed when
        ``slide`` is set) from ``pixels`` (nq, 3, S, S), embed them (``embed(pixels, boxes)`` → (nq, m, d),
        an embed actor's ``embed_crops_each``), search them in the global index (``search(x)`` → ShardResult
        with D_norm) and merge the hits into ``local`` (``merge_crops``)."""
        nq = local.I.shape[0]
        boxes = crop_boxes(local, self.refine)
        if self.slide:
            boxes = np.concatenate([boxes, self._slid(nq, sizes)], axis=1)
        found = np.isfinite(boxes[..., 0])
        if not found.any():
            return local
        if len(pixels) != len(boxes):
            raise ValueError(f"{len(pixels)} query images for {len(boxes)} queries")
        x = embed(pixels, boxes)
        flat = np.ascontiguousarray(x[found], dtype=np.float32)
        return merge_crops(local, boxes, search(flat))

    def _slid(self, nq: int, sizes: Sequence[tuple[int, int]] | None) -> np.ndarray:
        """(nq, n, 4) float32 the sliding windows of ``nq`` queries of ``sizes`` px (NaN rows pad the
        queries with fewer)."""
        if sizes is None or len(sizes) != nq:
            raise ValueError(f"sliding windows need the sizes of all {nq} queries")
        windows = [slide_boxes(self.slide, int(w), int(h)) for w, h in sizes]
        slid = np.full((nq, max(len(b) for b in windows), 4), np.nan, dtype=np.float32)
        for q, b in enumerate(windows):
            slid[q, : len(b)] = b
        return slid

    def split_scores(self, x_aligned: np.ndarray, I: np.ndarray, region_index: RegionIndex) -> np.ndarray:
        """Somepalli et al.'s split product, position-aligned and with every chunk normalised: for each query
        q and training image ``I[q, j]``, the max over boxes r of the cosine (in the region index's space) of
        the query's box r and the image's box r. x_aligned: (nq, R, d) raw; I: (nq, k) image ids (-1 = none).
        Returns (nq, k) float32, NaN for -1."""
        nq, k = I.shape
        n_boxes = len(self.train_boxes)
        if x_aligned.shape[:2] != (nq, n_boxes):
            raise ValueError(f"aligned vectors {x_aligned.shape} for {nq} queries and {n_boxes} boxes")
        q, j = np.nonzero(I >= 0)
        out = np.full((nq, k), np.nan, dtype=np.float32)
        if not len(q):
            return out
        shard, row = layout.unpack_ids(I[q, j])
        boxes = np.arange(n_boxes)
        region_ids = ((shard[:, None] << layout.ROW_BITS) | (row[:, None] * n_boxes + boxes)).ravel()
        owner = (q[:, None] * n_boxes + boxes).ravel()
        flat = x_aligned.reshape(nq * n_boxes, -1)
        scores = region_index.pair_scores(flat, owner, region_ids).reshape(len(q), n_boxes)
        with np.errstate(invalid="ignore"):
            out[q, j] = np.nanmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
        return out


def best_windows(hits: ShardResult, nq: int, n_windows: int, m: int) -> np.ndarray:
    """(nq, min(m, n_windows)) int64: each query's windows by their best normalised hit (``hits.D_norm``;
    rows query-major, ``n_windows`` a query), best first; windows without a hit last."""
    key = np.where(hits.I >= 0, np.nan_to_num(hits.D_norm, nan=-np.inf), -np.inf).max(axis=1)
    return np.argsort(-key.reshape(nq, n_windows), axis=1, kind="stable")[:, :m]


def replace_rows(hits: ShardResult, rows: np.ndarray, new: ShardResult) -> ShardResult:
    """``hits`` with its rows ``rows`` replaced by the rows of ``new`` (one each, in order; as wide or wider:
    cut to ``hits``' width), metadata of both."""
    width = hits.I.shape[1]
    out = {}
    for name in ("D", "I", "D_raw", "D_norm", "prior"):
        old, replacing = getattr(hits, name), getattr(new, name)
        if old is None:
            continue
        if replacing is None:  # rows without this column (no densities): as if zero
            replacing = np.zeros((len(rows), width), dtype=old.dtype)
        column = old.copy()
        column[rows] = replacing[:, :width]
        out[name] = column
    return replace(hits, meta={**hits.meta, **new.meta}, **out)


def local_windows(cfg: Any, manifest: dict[str, Any]) -> LocalWindows | None:
    """Region matching for scan config ``cfg`` (``regions`` auto/on/off, query-window overrides) of the index
    ``manifest`` describes, or None when off."""
    mode = {"true": "on", "false": "off"}.get(str(cfg.regions).lower(), str(cfg.regions).lower())
    if getattr(cfg, "split_product", False) and (mode == "off" or not manifest.get("regions")):
        raise CopyscanError(
            "split_product compares the region boxes of queries and training images: it needs an index built "
            "with regions=true and a scan with regions on"
        )
    if mode == "off":
        return None
    if not manifest.get("regions"):
        if mode == "on":
            raise CopyscanError(
                f"regions=on but {cfg.index} has no region index; build it with `copyscan index ... regions=true`"
            )
        return None
    sub = region_manifest(cfg.index, manifest, cfg.storage_options)
    split = bool(getattr(cfg, "split_product", False))
    mode = getattr(cfg, "region_query_mode", "crop")
    spec = query_regions(manifest, cfg.region_query_grid, cfg.region_query_size, mode, split)
    aligned = _aligned(manifest) if split else None
    if aligned is not None and aligned.mode == "crop" and aligned.size != spec.size:
        raise CopyscanError(
            f"split_product on an index with cropped regions at {aligned.size} px needs "
            f"region_query_size={aligned.size} (the windows are cut from the same pixels)"
        )
    return LocalWindows(
        spec=spec,
        manifest=sub,
        train_boxes=[tuple(b) for b in manifest["regions"]["boxes"]],
        normalise=ScoreNormaliser(
            layout.regions_root(cfg.index),
            sub,
            cfg.beta,
            cfg.storage_options,
            per_image=len(manifest["regions"]["boxes"]),
        ),
        k=cfg.k,
        density_beta=cfg.region_density_beta,
        aligned=aligned,
        refine=int(getattr(cfg, "region_refine", 0)),
        slide=parse_slide(getattr(cfg, "region_slide", "")),
        # hybrid on an embedder that cannot pool crops every window already
        recrop=int(getattr(cfg, "region_recrop", HYBRID_CROPS))
        if mode == "hybrid" and spec.mode == "rmac"
        else 0,
    )


def _aligned(manifest: dict[str, Any]) -> RegionSpec:
    """The region index's own boxes, made as the index made them, to cut from a query for the split product
    (from the pixels the query windows are made from)."""
    described = manifest["regions"]
    return RegionSpec(
        tuple(tuple(b) for b in described["boxes"]),
        size=int(described.get("size") or described.get("query_size") or QUERY_SIZE),
        mode=described.get("mode", "pool"),
    )
