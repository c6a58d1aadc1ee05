"""Region matching's answer per query (``LocalResult``): window hits aggregated per training image
(``aggregate``), the crops its frames give (``crop_boxes``) and the crops' global hits merged in
(``merge_crops``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from copyscan.indexing.models.regions import WHOLE, Box
from copyscan.indexing.store import layout
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.geometry import CROP_IOU, MIN_CROP, REFINE_PAIRS, box_iou, frames


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


@dataclass(frozen=True)
class _Pairs:
    """Window hits of ``nq`` queries as (nq, W · kr) arrays of (window, region) pairs, window-major.

    I: region ids (-1 = none); images: their image ids; boxes: their region box; key: the normalised
    score pairs rank by (-inf for none); D (cosine, densities added back), D_norm, D_raw: the scores;
    kr: hits per window (pair j is window j // kr); qb, tb: (W, 4) / (R, 4) the window and region boxes."""

    I: np.ndarray
    images: np.ndarray
    boxes: np.ndarray
    key: np.ndarray
    D: np.ndarray
    D_norm: np.ndarray
    D_raw: np.ndarray
    kr: int
    qb: np.ndarray
    tb: np.ndarray

    @classmethod
    def of(
        cls,
        hits: ShardResult,
        nq: int,
        n_windows: int,
        query_boxes: Sequence[Box],
        train_boxes: Sequence[Box],
    ) -> _Pairs:
        kr = hits.I.shape[1]
        I = hits.I.reshape(nq, n_windows * kr)
        # region id shard << 32 | (row · R + box) → image id shard << 32 | row, and the box
        per_image = len(train_boxes)
        D = hits.D.reshape(nq, -1)
        if hits.prior is not None:  # hits ranked by cosine − β · region density: report the cosine
            D = D + hits.prior.reshape(nq, -1)
        return cls(
            I=I,
            images=layout.image_ids(I, per_image),
            boxes=np.where(I >= 0, (I & layout.ROW_MASK) % per_image, 0).astype(np.int32),
            key=np.where(I >= 0, np.nan_to_num(hits.D_norm, nan=-np.inf).reshape(nq, -1), -np.inf),
            D=D,
            D_norm=hits.D_norm.reshape(nq, -1),
            D_raw=hits.D_raw.reshape(nq, -1),
            kr=kr,
            qb=np.asarray(query_boxes, dtype=np.float32).reshape(-1, 4),
            tb=np.asarray(train_boxes, dtype=np.float32).reshape(-1, 4),
        )


def aggregate(
    hits: ShardResult, nq: int, n_windows: int, k: int, query_boxes: Sequence[Box], train_boxes: Sequence[Box]
) -> LocalResult:
    """Window hits (``hits``: nq · n_windows rows, query-major, with ``D_norm`` set) → the top ``k`` training
    images of every query, each by its best (window, region) pair on the normalised score."""
    if hits.D_norm is None:
        raise ValueError("window hits need their normalised scores (D_norm) first")
    pairs = _Pairs.of(hits, nq, n_windows, query_boxes, train_boxes)
    out = LocalResult.empty(nq, k, query_boxes, train_boxes)
    for q in range(nq):
        _best_images(out, q, pairs, hits.meta, k)
    return out


def _best_images(out: LocalResult, q: int, pairs: _Pairs, meta: dict[int, dict[str, Any]], k: int) -> None:
    """Fill query ``q``'s row of ``out``: its best ``k`` images, each by its best pair, with the frame the
    image's best ``REFINE_PAIRS`` pairs imply (their median)."""
    order = np.argsort(-pairs.key[q], kind="stable")
    order = order[np.isfinite(pairs.key[q][order])]
    _, first = np.unique(pairs.images[q][order], return_index=True)  # best pair of every image
    best = order[np.sort(first)][:k]
    n = len(best)
    out.I[q, :n] = pairs.images[q][best]
    out.S[q, :n] = pairs.D[q][best]
    out.S_norm[q, :n] = pairs.D_norm[q][best]
    out.S_raw[q, :n] = pairs.D_raw[q][best]
    out.window[q, :n] = best // pairs.kr
    out.box[q, :n] = pairs.boxes[q][best]
    out.qbox[q, :n] = pairs.qb[out.window[q, :n]]
    out.tbox[q, :n] = pairs.tb[out.box[q, :n]]
    ranked = pairs.images[q][order]
    for r in range(n):  # the image's frame: median over its best pairs
        mine = order[ranked == out.I[q, r]][:REFINE_PAIRS]
        out.frame[q, r] = np.median(
            frames(pairs.qb[mine // pairs.kr], pairs.tb[pairs.boxes[q][mine]]), axis=0
        )
    for j in best:
        m = meta[int(pairs.I[q, j])]
        out.meta.setdefault(
            int(pairs.images[q, j]),
            {key: m[key] for key in ("train_key", "train_url", "caption", "index_shard")},
        )


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


# what an image region matching found keeps of its region pair when merged with the crops' hits
_REGION_PAIR = ("S", "S_raw", "window", "box", "qbox", "tbox", "frame")


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
    crop_of = boxes[cq, cm]  # (crops, 4): the box of every searched crop, row by row of ``hits``
    out = LocalResult.empty(nq, k, local.query_boxes, local.train_boxes, crops=True)
    out.meta = dict(local.meta)
    out.split = None if local.split is None else np.full_like(local.split, np.nan)
    for q in range(nq):
        region = {int(i): r for r, i in enumerate(local.I[q]) if i >= 0}
        best = _best_crop_hits(hits, np.nonzero(cq == q)[0])
        found = np.isfinite(local.S_norm[q])
        floor = float(local.S_norm[q][found].min()) if found.any() else 0.0
        total = {
            image: (float(local.S_norm[q, region[image]]) if image in region else floor)
            + max(0.0, best[image][0] if image in best else 0.0)
            for image in region.keys() | best.keys()
        }
        for r, image in enumerate(sorted(total, key=lambda i: (-total[i], i))[:k]):
            out.I[q, r], out.S_norm[q, r] = image, total[image]
            _merged_rank(out, q, r, local, region.get(image), best.get(image), hits, crop_of)
    return out


def _best_crop_hits(hits: ShardResult, rows: np.ndarray) -> dict[int, tuple[float, int, int]]:
    """{image: (its best score_norm among the hits of crop rows ``rows``, that hit's row, its column)}."""
    best: dict[int, tuple[float, int, int]] = {}
    for row in rows:
        for j in range(hits.I.shape[1]):
            image, score = int(hits.I[row, j]), float(hits.D_norm[row, j])
            if image >= 0 and np.isfinite(score) and (image not in best or score > best[image][0]):
                best[image] = (score, int(row), j)
    return best


def _merged_rank(
    out: LocalResult,
    q: int,
    r: int,
    local: LocalResult,
    region_rank: int | None,
    crop_hit: tuple[float, int, int] | None,
    hits: ShardResult,
    crop_of: np.ndarray,
) -> None:
    """Fill rank ``r`` of query ``q`` of ``out`` (its image ``out.I[q, r]`` set): the crop that found it
    (``crop_hit``: score, hit row, column; None: no crop did), and the region pair it had at
    ``region_rank`` of ``local`` (None: only a crop found it, whose scores and box it then takes)."""
    image = int(out.I[q, r])
    if crop_hit is not None:
        score, row, j = crop_hit
        out.crop[q, r], out.crop_box[q, r] = score, crop_of[row]
        if image not in out.meta:
            out.meta[image] = hits.meta[image]
    if region_rank is not None:  # the region pair's cosine and boxes
        for name in _REGION_PAIR:
            getattr(out, name)[q, r] = getattr(local, name)[q, region_rank]
        if local.split is not None:
            out.split[q, r] = local.split[q, region_rank]
    else:  # found by a crop only: the crop's scores and box
        out.S[q, r], out.S_raw[q, r] = hits.D[row, j], hits.D_raw[row, j]
        out.qbox[q, r], out.frame[q, r] = crop_of[row], crop_of[row]
        out.tbox[q, r] = np.asarray(WHOLE, dtype=np.float32)
