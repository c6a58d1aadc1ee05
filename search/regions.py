"""Partial copies at scan time: query windows searched against the region index, aggregated per image.

Every query is cut into windows (``indexing.regions``: the whole image plus a grid of smaller boxes,
cropped from the query preprocessed at the index's ``query_size`` and embedded like images). Each window
is searched in the region index (``RegionSearcher``: the training images' region vectors, exact re-ranking
like the global index), each hit is score-normalised against the region index's own background sample,
and the hits of one query are aggregated per training image: its ``local_score`` is the best (window,
region) pair by normalised score, which also gives ``query_box`` and ``train_box``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing import layout, storage
from indexing.errors import CopyscanError
from indexing.manifest import load_manifest
from indexing.regions import Box, RegionSpec, parse_grid
from search.normalise import ScoreNormaliser
from search.searcher import ShardResult, ShardSearcher, index_cache_dir, load_metadata


def region_manifest(
    index_url: str, manifest: dict[str, Any], storage_options: storage.StorageOptions | None = None
) -> dict[str, Any] | None:
    """The region index's manifest (``OUT/regions/manifest.json``), or None when the index has none; it must
    belong to this build of the index."""
    described = manifest.get("regions")
    if not described:
        return None
    sub = load_manifest(layout.regions_root(index_url), storage_options)
    if sub.get("build_id") != described.get("build_id"):
        raise CopyscanError(
            f"the region index of {index_url} (build {sub.get('build_id')}) is not the one its manifest names "
            f"({described.get('build_id')}); rerun `copyscan index` to finish it"
        )
    return sub


def query_regions(manifest: dict[str, Any], grid: str | None = None, size: int = 0) -> RegionSpec:
    """The query windows of a scan: the index's (``regions.query_grid`` at ``regions.query_size``) unless
    overridden."""
    described = manifest["regions"]
    boxes = parse_grid(grid if grid else described["query_grid"])
    return RegionSpec(tuple(boxes), size=int(size or described["query_size"]), mode="crop")


class RegionSearcher(ShardSearcher):
    """A ShardSearcher over region index shards that describes hits by their training image.

    Region ids are ``shard << 32 | (row · per_image + box)``; ``describe`` adds the image's id and metadata
    (read from the index's own metadata files) and the box."""

    def __init__(
        self,
        index_url: str,
        sub_manifest: dict[str, Any],
        index_shards: Sequence[int],
        cache_dir: str = "",
        storage_options: storage.StorageOptions | None = None,
        density_beta: float = 0.0,
    ) -> None:
        root = layout.regions_root(index_url)
        super().__init__(root, sub_manifest, index_shards, cache_dir, storage_options, density_beta)
        self.per_image = int(sub_manifest["regions_of"]["per_image"])
        cache = index_cache_dir(cache_dir, index_url, sub_manifest)
        for s in self.vectors:
            self.metadata[s] = load_metadata(
                layout.metadata_url(index_url, s),
                os.path.join(cache, "metadata", f"metadata_{s:05d}.parquet"),
                storage_options,
            )

    def describe(self, I: np.ndarray) -> dict[int, dict[str, Any]]:
        meta: dict[int, dict[str, Any]] = {}
        unique = np.unique(I[I >= 0])
        shards, rows = layout.unpack_ids(unique)
        for i, s, r in zip(unique.tolist(), shards.tolist(), rows.tolist(), strict=True):
            image, box = divmod(r, self.per_image)
            columns = self.metadata[s]
            meta[i] = {
                "train_key": columns["key"][image],
                "train_url": columns["url"][image],
                "caption": columns["caption"][image],
                "index_shard": self.owner[s],
                "image_id": int(layout.pack_ids(s, np.array([image]))[0]),
                "box": box,
            }
        return meta


@dataclass
class LocalResult:
    """Per query, the best training images by region matching, best first.

    I: (nq, k) int64 image ids (-1 = none); S: local_score (cosine in the region index's whitened space);
    S_norm: local_score_norm (S − β · the window's background bias); S_raw: raw cosine of the pair;
    window, box: (nq, k) the query window and training region of the best pair (indexes into
    ``query_boxes`` / ``train_boxes``); meta: image id → metadata.
    """

    I: np.ndarray
    S: np.ndarray
    S_norm: np.ndarray
    S_raw: np.ndarray
    window: np.ndarray
    box: np.ndarray
    meta: dict[int, dict[str, Any]]
    query_boxes: Sequence[Box]
    train_boxes: Sequence[Box]
    split: np.ndarray | None = None  # (nq, k) split product of each (query, image), when asked for


def aggregate(
    hits: ShardResult, nq: int, n_windows: int, k: int, query_boxes: Sequence[Box], train_boxes: Sequence[Box]
) -> LocalResult:
    """Window hits (``hits``: nq · n_windows rows, query-major, with ``D_norm`` set) → the top ``k`` training
    images of every query, each by its best (window, region) pair on the normalised score."""
    if hits.D_norm is None:
        raise ValueError("window hits need their normalised scores (D_norm) first")
    kr = hits.I.shape[1]
    I = hits.I.reshape(nq, n_windows * kr)
    order_key = np.where(I >= 0, np.nan_to_num(hits.D_norm, nan=-np.inf).reshape(nq, -1), -np.inf)
    # region id shard << 32 | (row · R + box) → image id shard << 32 | row, and the box
    per_image = len(train_boxes)
    images = layout.image_ids(I, per_image)
    boxes = np.where(I >= 0, (I & layout.ROW_MASK) % per_image, 0).astype(np.int32)
    out = LocalResult(
        I=np.full((nq, k), -1, dtype=np.int64),
        S=np.full((nq, k), np.nan, dtype=np.float32),
        S_norm=np.full((nq, k), np.nan, dtype=np.float32),
        S_raw=np.full((nq, k), np.nan, dtype=np.float32),
        window=np.zeros((nq, k), dtype=np.int32),
        box=np.zeros((nq, k), dtype=np.int32),
        meta={},
        query_boxes=query_boxes,
        train_boxes=train_boxes,
    )
    D = hits.D.reshape(nq, -1)
    if hits.prior is not None:  # hits ranked by cosine − β · region density: report the cosine
        D = D + hits.prior.reshape(nq, -1)
    D_norm = hits.D_norm.reshape(nq, -1)
    D_raw = hits.D_raw.reshape(nq, -1)
    for q in range(nq):
        order = np.argsort(-order_key[q], kind="stable")
        order = order[np.isfinite(order_key[q][order])]
        _, first = np.unique(images[q][order], return_index=True)  # best pair of every image
        best = order[np.sort(first)][:k]
        n = len(best)
        out.I[q, :n] = images[q][best]
        out.S[q, :n] = D[q][best]
        out.S_norm[q, :n] = D_norm[q][best]
        out.S_raw[q, :n] = D_raw[q][best]
        out.window[q, :n] = best // kr
        out.box[q, :n] = boxes[q][best]
        for j in best:
            m = hits.meta[int(I[q, j])]
            out.meta.setdefault(
                int(images[q, j]),
                {key: m[key] for key in ("train_key", "train_url", "caption", "index_shard")},
            )
    return out


@dataclass
class LocalWindows:
    """Region matching in a scan: the query windows, the region index, and (set by the scan) the fan-out
    over its shards. ``search`` turns a chunk's window vectors into a ``LocalResult``."""

    spec: RegionSpec
    manifest: dict[str, Any]  # the region index's
    train_boxes: list[Box]
    normalise: ScoreNormaliser
    k: int
    density_beta: float = 1.0  # ScanConfig.region_density_beta
    fanout: Any = None  # scan_ray._Fanout over the region index (regions=True, k=region_hits)
    # the region index's own boxes, made like the index made them (split product), or None
    aligned: RegionSpec | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "windows": len(self.spec.boxes),
            "query_grid_boxes": [list(b) for b in self.spec.boxes],
            "query_size": self.spec.size,
            "regions_per_image": len(self.train_boxes),
            "region_index_vectors": self.manifest["ntotal"],
            "region_index_factory": self.manifest["index"]["factory"],
            "region_hits_per_window": self.fanout.k if self.fanout is not None else None,
            # hits rank by cosine − beta · region density; 0 when off or the index has no densities (built
            # before copyscan stored them: rebuild its region index to get them)
            "region_density_beta": self.density_beta if self.manifest["index"].get("region_density") else 0.0,
            "split_product": self.aligned is not None,
        }

    def search(self, x_windows: np.ndarray) -> LocalResult:
        """x_windows: (nq, W, d) raw window descriptors → the top ``k`` training images of every query."""
        nq, n_windows, dim = x_windows.shape
        flat = np.ascontiguousarray(x_windows.reshape(nq * n_windows, dim), dtype=np.float32)
        hits = self.fanout.search(flat)
        hits.D_norm = self.normalise(flat, hits.D, hits.I)
        return aggregate(hits, nq, n_windows, self.k, self.spec.boxes, self.train_boxes)

    def split_scores(self, x_aligned: np.ndarray, I: np.ndarray) -> np.ndarray:
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
        scores = self.fanout.pair_scores(flat, owner, region_ids).reshape(len(q), n_boxes)
        with np.errstate(invalid="ignore"):
            out[q, j] = np.nanmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
        return out


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
    spec = query_regions(manifest, cfg.region_query_grid, cfg.region_query_size)
    aligned = None
    if getattr(cfg, "split_product", False):
        described = manifest["regions"]
        aligned = RegionSpec(
            tuple(tuple(b) for b in described["boxes"]),
            size=int(described.get("size") or spec.size),
            mode=described.get("mode", "pool"),
        )
        if aligned.mode == "crop" and aligned.size != spec.size:
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
    )
