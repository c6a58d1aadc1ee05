"""Partial copies at scan time: query windows searched against the region index, aggregated per image.

Every query is cut into windows (``indexing.models.regions``: the whole image plus a grid of smaller boxes,
cropped from the query preprocessed at the index's ``query_size`` and embedded like images). Each window
is searched in the region index (``RegionSearcher``: the training images' region vectors, exact re-ranking
like the global index), each hit is score-normalised against the region index's own background sample,
and the hits of one query are aggregated per training image: its ``local_score`` is the best (window,
region) pair by normalised score, which also gives ``query_box`` and ``train_box``.

Localise, then search (``refine``): a (window, region) pair also says where the whole training image would
lie in the query if the window's content is that region of it (same scale along each axis, ``frames``).
The median of that estimate over an image's best ``REFINE_PAIRS`` pairs is its *frame*; the frames of the
best ``ScanConfig.region_refine`` images are cut from the query, embedded like whole images and searched
in the global index (``crop_boxes`` / ``merge_crops``). A pasted object cut out this way matches its
source like a whole copy does, and that search is not limited to the images region matching found; an
image's best crop score adds to its region score.

Sliding windows (``slide``, ``ScanConfig.region_slide``) are crops too, made without region matching:
squares or rectangles of the query (sides in fractions of its shorter side, ``slide_boxes``),
``SLIDE_STEP`` of a side apart, searched in the global index with the frames. They find pasted objects
whose source region matching ranked too low to get a frame, but bring about as many false matches (off by
default; README).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from indexing.errors import CopyscanError
from indexing.models.regions import WHOLE, Box, RegionSpec, parse_grid, parse_slide
from indexing.store import layout, storage
from indexing.store.manifest import load_manifest
from search.ann.normalise import ScoreNormaliser
from search.ann.searcher import ShardSearcher, index_cache_dir, load_metadata
from search.ann.topk import ShardResult


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


# an image's frame is the median of the frames its best REFINE_PAIRS pairs imply (one pair alone is off by
# the region grid's coarseness: median IoU with the pasted object 0.63 for one pair, 0.73 for 8, measured on
# bench/partial_copies.py's queries); crops narrower than MIN_CROP of a side, or overlapping the whole query
# or an earlier crop of the same query by IoU >= CROP_IOU, are not embedded
REFINE_PAIRS = 8
MIN_CROP = 0.05
CROP_IOU = 0.8
# sliding windows: neighbours SLIDE_STEP of the side apart (the last one flush with the far edge), at most
# SLIDE_MAX_AXIS along an axis (then evenly spread), so an extreme panorama costs a bounded number of crops
SLIDE_STEP = 0.34
SLIDE_MAX_AXIS = 12


def frames(query_boxes: np.ndarray, train_boxes: np.ndarray) -> np.ndarray:
    """(n, 4) query boxes matched to (n, 4) training-image boxes → (n, 4): where the whole training image
    (box (0, 0, 1, 1)) lies in the query, if the query box shows that training box scaled along each axis
    by the ratio of their sides. Not clipped."""
    q = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(train_boxes, dtype=np.float64).reshape(-1, 4)
    sx = (q[:, 2] - q[:, 0]) / (t[:, 2] - t[:, 0])
    sy = (q[:, 3] - q[:, 1]) / (t[:, 3] - t[:, 1])
    x0, y0 = q[:, 0] - t[:, 0] * sx, q[:, 1] - t[:, 1] * sy
    return np.stack([x0, y0, x0 + sx, y0 + sy], axis=1).astype(np.float32)


def _positions(extent: float) -> np.ndarray:
    """Starts (fractions) of windows ``extent`` wide along one axis of length 1 (``SLIDE_STEP`` apart)."""
    room = 1.0 - extent
    if room <= 1e-9:
        return np.zeros(1)
    starts = np.append(np.arange(0.0, room - 1e-9, SLIDE_STEP * extent), room)
    return starts if len(starts) <= SLIDE_MAX_AXIS else np.linspace(0.0, room, SLIDE_MAX_AXIS)


def slide_boxes(sizes: Sequence[float | tuple[float, float]], width: int, height: int) -> np.ndarray:
    """The sliding windows of a ``width`` × ``height`` px query: for every size in ``sizes`` (a side, or a
    (width, height) pair, fractions of its shorter side), squares (rectangles) in its pixels, row by row
    → (n, 4) float32 fractions x0, y0, x1, y1."""
    short = min(width, height)
    out = []
    for size in sizes:
        sw, sh = (size, size) if np.isscalar(size) else size
        w, h = sw * short / width, sh * short / height
        for y in _positions(h):
            out.extend((x, y, x + w, y + h) for x in _positions(w))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class LocalResult:
    """Per query, the best training images by region matching, best first.

    I: (nq, k) int64 image ids (-1 = none); S: local_score (cosine in the region index's whitened space);
    S_norm: local_score_norm (S − β · the window's background bias); S_raw: raw cosine of the pair;
    window, box: (nq, k) the query window and training region of the best pair (indexes into
    ``query_boxes`` / ``train_boxes``); meta: image id → metadata. qbox, tbox: (nq, k, 4) those boxes'
    coordinates (for an image only a crop found: the crop, and the whole training image); frame: (nq, k, 4)
    where the training image lies in the query (``frames``, median over its best pairs); crop, crop_box:
    (nq, k) / (nq, k, 4) the image's best normalised score when the query's crops were searched in the
    global index, and that crop (NaN: no crop found it, or no refine; ``merge_crops``, which also adds
    ``crop`` to ``S_norm``).
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
    qbox: np.ndarray | None = None
    tbox: np.ndarray | None = None
    frame: np.ndarray | None = None
    crop: np.ndarray | None = None
    crop_box: np.ndarray | None = None

    @classmethod
    def empty(
        cls, nq: int, k: int, query_boxes: Sequence[Box], train_boxes: Sequence[Box], crops: bool = False
    ) -> LocalResult:
        """No image for any of ``nq`` queries' ``k`` ranks (``crops``: with the crop columns too)."""
        blank = lambda *shape: np.full((nq, k, *shape), np.nan, dtype=np.float32)  # noqa: E731
        return cls(
            I=np.full((nq, k), -1, dtype=np.int64),
            S=blank(),
            S_norm=blank(),
            S_raw=blank(),
            window=np.zeros((nq, k), dtype=np.int32),
            box=np.zeros((nq, k), dtype=np.int32),
            meta={},
            query_boxes=query_boxes,
            train_boxes=train_boxes,
            qbox=blank(4),
            tbox=blank(4),
            frame=blank(4),
            crop=blank() if crops else None,
            crop_box=blank(4) if crops else None,
        )


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
    out = LocalResult.empty(nq, k, query_boxes, train_boxes)
    qb = np.asarray(query_boxes, dtype=np.float32).reshape(-1, 4)
    tb = np.asarray(train_boxes, dtype=np.float32).reshape(-1, 4)
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
        out.qbox[q, :n] = qb[out.window[q, :n]]
        out.tbox[q, :n] = tb[out.box[q, :n]]
        ranked = images[q][order]
        for r in range(n):  # the image's frame: median over its best pairs
            pairs = order[ranked == out.I[q, r]][:REFINE_PAIRS]
            out.frame[q, r] = np.median(frames(qb[pairs // kr], tb[boxes[q][pairs]]), axis=0)
        for j in best:
            m = hits.meta[int(I[q, j])]
            out.meta.setdefault(
                int(images[q, j]),
                {key: m[key] for key in ("train_key", "train_url", "caption", "index_shard")},
            )
    return out


def crop_boxes(local: LocalResult, m: int) -> np.ndarray:
    """The crops to search for every query: the frames of its best ``m`` images, clipped to the query, each
    at least ``MIN_CROP`` of a side and overlapping neither the whole query (the global search has searched
    that) nor an earlier crop of the query by IoU >= ``CROP_IOU``. Returns (nq, m, 4) float32, NaN rows
    where there is no crop."""
    nq = local.I.shape[0]
    out = np.full((nq, m, 4), np.nan, dtype=np.float32)
    if local.frame is None:
        return out
    for q in range(nq):
        kept: list[np.ndarray] = []
        for r in range(min(m, local.I.shape[1])):
            if local.I[q, r] < 0 or not np.isfinite(local.frame[q, r]).all():
                continue
            box = np.clip(local.frame[q, r], 0.0, 1.0)
            if box[2] - box[0] < MIN_CROP or box[3] - box[1] < MIN_CROP:
                continue
            if any(box_iou(box, other) >= CROP_IOU for other in [WHOLE, *kept]):
                continue
            out[q, len(kept)] = box
            kept.append(box)
    return out


def merge_crops(local: LocalResult, boxes: np.ndarray, hits: ShardResult) -> LocalResult:
    """Region matching's images (``local``) and the global-index hits of the query crops ``boxes``
    ((nq, m, 4), NaN = none; ``hits``: the searched crops' results, their rows in the order of
    ``np.nonzero(finite boxes)``, with ``D_norm`` set), merged per query.

    The two are evidence of one copy, on different scales (the best of ~200 windows' normalised scores sits
    higher above the background than a single crop's), so they are added, not compared: an image's
    ``S_norm`` becomes its region score + its best crop score (``crop``, clipped at 0; 0 when no crop found
    it). An image only the crops found takes the query's lowest region score kept (the most it could have
    had there) and its crop's cosine, raw cosine and box (``qbox`` = the crop, ``tbox`` = the whole image).
    The best ``k`` images are kept."""
    if hits.D_norm is None:
        raise ValueError("crop hits need their normalised scores (D_norm) first")
    nq, k = local.I.shape
    cq, cm = np.nonzero(np.isfinite(boxes[..., 0]))
    if len(cq) != hits.I.shape[0]:
        raise ValueError(f"{hits.I.shape[0]} crop results for {len(cq)} crops")
    copied = ("S", "S_raw", "window", "box", "qbox", "tbox", "frame")
    out = LocalResult.empty(nq, k, local.query_boxes, local.train_boxes, crops=True)
    out.meta = dict(local.meta)
    out.split = None if local.split is None else np.full_like(local.split, np.nan)
    whole = np.asarray(WHOLE, dtype=np.float32)
    for q in range(nq):
        region = {int(i): r for r, i in enumerate(local.I[q]) if i >= 0}
        found = np.isfinite(local.S_norm[q])
        floor = float(local.S_norm[q][found].min()) if found.any() else 0.0
        best: dict[int, tuple[float, int, int]] = {}  # image → (crop score_norm, hit row, column)
        for row in np.nonzero(cq == q)[0]:
            for j in range(hits.I.shape[1]):
                image, score = int(hits.I[row, j]), float(hits.D_norm[row, j])
                if image >= 0 and np.isfinite(score) and (image not in best or score > best[image][0]):
                    best[image] = (score, int(row), j)
        total = {
            image: (float(local.S_norm[q, region[image]]) if image in region else floor)
            + max(0.0, best[image][0] if image in best else 0.0)
            for image in region.keys() | best.keys()
        }
        for r, image in enumerate(sorted(total, key=lambda i: (-total[i], i))[:k]):
            out.I[q, r], out.S_norm[q, r] = image, total[image]
            if image in best:
                score, row, j = best[image]
                out.crop[q, r], out.crop_box[q, r] = score, boxes[q, cm[row]]
                if image not in out.meta:
                    out.meta[image] = hits.meta[image]
            if image in region:  # the region pair's cosine and boxes
                for name in copied:
                    getattr(out, name)[q, r] = getattr(local, name)[q, region[image]]
                if local.split is not None:
                    out.split[q, r] = local.split[q, region[image]]
            else:  # found by a crop only: the crop's scores and box
                out.S[q, r], out.S_raw[q, r] = hits.D[row, j], hits.D_raw[row, j]
                out.qbox[q, r], out.frame[q, r] = boxes[q, cm[row]], boxes[q, cm[row]]
                out.tbox[q, r] = whole
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
    refine: int = 0  # ScanConfig.region_refine: crops of the best images' frames searched in the global index
    # ScanConfig.region_slide: sliding windows' (width, height), searched like the crops
    slide: tuple[tuple[float, float], ...] = ()

    @property
    def crops(self) -> bool:
        """Whether the scan cuts crops from the queries (frames or sliding windows), so keeps their pixels."""
        return self.refine > 0 or bool(self.slide)

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

    def search(self, x_windows: np.ndarray) -> LocalResult:
        """x_windows: (nq, W, d) raw window descriptors → the top ``k`` training images of every query."""
        nq, n_windows, dim = x_windows.shape
        flat = np.ascontiguousarray(x_windows.reshape(nq * n_windows, dim), dtype=np.float32)
        hits = self.fanout.search(flat)
        hits.D_norm = self.normalise(flat, hits.D, hits.I)
        return aggregate(hits, nq, n_windows, self.k, self.spec.boxes, self.train_boxes)

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
            if sizes is None or len(sizes) != nq:
                raise ValueError(f"sliding windows need the sizes of all {nq} queries")
            windows = [slide_boxes(self.slide, int(w), int(h)) for w, h in sizes]
            slid = np.full((nq, max(len(b) for b in windows), 4), np.nan, dtype=np.float32)
            for q, b in enumerate(windows):
                slid[q, : len(b)] = b
            boxes = np.concatenate([boxes, slid], axis=1)
        found = np.isfinite(boxes[..., 0])
        if not found.any():
            return local
        if len(pixels) != len(boxes):
            raise ValueError(f"{len(pixels)} query images for {len(boxes)} queries")
        x = embed(pixels, boxes)
        flat = np.ascontiguousarray(x[found], dtype=np.float32)
        return merge_crops(local, boxes, search(flat))

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
        refine=int(getattr(cfg, "region_refine", 0)),
        slide=parse_slide(getattr(cfg, "region_slide", "")),
    )
