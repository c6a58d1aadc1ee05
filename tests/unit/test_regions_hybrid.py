"""Hybrid query windows (``region_query_mode=hybrid``): windows pooled from one pass select, the best few
are cut out and embedded again, and their hits replace the pooled ones (search/regions/windows.py)."""

from __future__ import annotations

import numpy as np
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.regions import (
    HYBRID_CROPS,
    HYBRID_QUERY_SIZE,
    POOL_QUERY_SIZE,
    QUERY_GRID,
    WHOLE,
    RegionSpec,
    parse_grid,
    query_mode,
)
from copyscan.indexing.store import layout
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.windows import LocalWindows, best_windows, replace_rows


class ExactRegions:
    """An exact inner-product region index over ``xb`` (one region per image, shard 0): the part of the
    scan's region index ``LocalWindows`` uses (``search``), its top ``k`` hits of every row."""

    def __init__(self, xb: np.ndarray, k: int) -> None:
        self.xb, self.k = xb, k
        self.searched: list[np.ndarray] = []

    def search(self, xq: np.ndarray) -> ShardResult:
        self.searched.append(xq)
        scores = xq @ self.xb.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        D = np.take_along_axis(scores, order, axis=1).astype(np.float32)
        I = layout.pack_ids(0, order.ravel()).reshape(order.shape)
        meta = {
            int(i): {"train_key": f"img{int(i) & layout.ROW_MASK}", "train_url": "u", "caption": None,
                     "index_shard": 0}
            for i in np.unique(I)
        }  # fmt: skip
        return ShardResult(D, I, D.copy(), meta)


def _windows(recrop: int, n_windows: int = 4) -> LocalWindows:
    # fractions exact in float32: the crops' boxes name their windows
    boxes = (WHOLE, *((0.125 * w, 0.25, 0.125 * w + 0.25, 0.5) for w in range(1, n_windows)))
    return LocalWindows(
        spec=RegionSpec(tuple(boxes), size=HYBRID_QUERY_SIZE, mode="rmac"),
        manifest={},
        train_boxes=[WHOLE],
        normalise=lambda xq, D, I: D - 0.1,  # a constant background: D_norm = D - 0.1
        k=3,
        recrop=recrop,
    )


def test_best_windows_rank_each_querys_windows_by_their_best_normalised_hit():
    D_norm = np.array(
        [[0.2, 0.1], [0.9, 0.0], [0.5, 0.4], [np.nan, np.nan], [0.3, 0.8], [0.1, 0.7]], np.float32
    )
    I = np.array([[1, 2], [3, 4], [5, 6], [-1, -1], [1, 2], [3, -1]], np.int64)
    I[5, 0] = -1  # a hit of id -1 never counts, whatever its score
    hits = ShardResult(D_norm, I, D_norm, {}, D_norm=D_norm)
    # two queries of three windows: (0.2, 0.9, 0.5) and (-inf, 0.8, -inf)
    assert best_windows(hits, 2, 3, 2).tolist() == [[1, 2], [1, 0]]
    assert best_windows(hits, 2, 3, 5).shape == (2, 3)


def test_replace_rows_swaps_whole_rows_and_keeps_both_metadata():
    old = ShardResult(
        np.zeros((3, 2), np.float32), np.full((3, 2), 7, np.int64), np.zeros((3, 2), np.float32), {7: {"a": 1}},
        D_norm=np.zeros((3, 2), np.float32), prior=np.zeros((3, 2), np.float32),
    )  # fmt: skip
    new = ShardResult(
        np.ones((1, 3), np.float32), np.array([[8, 9, 10]]), np.ones((1, 3), np.float32), {8: {"b": 2}},
        D_norm=np.ones((1, 3), np.float32),
    )  # fmt: skip
    out = replace_rows(old, np.array([1]), new)
    assert out.I.tolist() == [[7, 7], [8, 9], [7, 7]]  # cut to the old width
    assert out.D_norm[1].tolist() == [1.0, 1.0] and out.D[0].tolist() == [0.0, 0.0]
    assert out.prior[1].tolist() == [0.0, 0.0]  # rows without densities: no prior
    assert set(out.meta) == {7, 8} and old.I[1].tolist() == [7, 7]  # the old result is left as it was


def test_hybrid_search_recrops_the_best_windows_and_their_hits_replace_the_pooled_ones():
    """Two queries, four windows each. Pooled, window 2 of query 0 sees image 1 at 0.6 and window 3 sees
    image 2 at 0.5; cropped, window 3 sees image 3 at 1.0 (the pasted object). With recrop=2 windows 2 and
    3 are cropped (the two best pooled hits), so image 3 wins; windows 0 and 1 keep their pooled hits."""
    xb = np.eye(4, dtype=np.float32)  # image i = e_i
    pooled = np.zeros((2, 4, 4), np.float32)
    pooled[0, :, 0] = 0.2  # every window a little like image 0
    pooled[0, 2, 1], pooled[0, 3, 2] = 0.6, 0.5
    pooled[1, :, 0] = 0.3
    pooled[1, 1, 2] = 0.9
    cropped = {(0, 2): np.array([0.1, 0.7, 0, 0]), (0, 3): np.array([0, 0, 0, 1.0])}
    seen = {}

    def embed(pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        seen["boxes"], seen["n"] = boxes, len(pixels)
        out = np.zeros((*boxes.shape[:2], 4), np.float32)
        for q in range(boxes.shape[0]):
            for m in range(boxes.shape[1]):
                window = windows.spec.boxes.index(tuple(float(v) for v in boxes[q, m]))
                # query 1: the crop sees what pooling saw
                out[q, m] = cropped.get((q, window), pooled[q, window])
        return out

    windows = _windows(recrop=2)
    regions = ExactRegions(xb, k=2)
    pixels = np.zeros((2, 3, 8, 8), np.uint8)
    local = windows.search(pooled, regions, pixels, embed)
    assert seen["n"] == 2 and seen["boxes"].shape == (2, 2, 4)
    chosen = [[windows.spec.boxes.index(tuple(float(v) for v in b)) for b in q] for q in seen["boxes"]]
    assert [sorted(c) for c in chosen] == [[2, 3], [0, 1]]  # query 1: window 1 (0.9), then the first at 0.3
    assert [len(x) for x in regions.searched] == [8, 4]  # all pooled windows, then the 2 × 2 crops
    image = lambda row: int(layout.pack_ids(0, np.array([row]))[0])  # noqa: E731
    assert local.I[0, 0] == image(3) and local.window[0, 0] == 3
    np.testing.assert_allclose(local.S_norm[0, 0], 0.9, atol=1e-6)  # the crop's 1.0 − 0.1
    assert local.I[1, 0] == image(2)  # query 1 unchanged by its crops
    # without re-cropping: the pooled hits only, nothing embedded
    seen.clear()
    plain = _windows(recrop=0).search(pooled, ExactRegions(xb, k=2))
    assert plain.I[0, 0] == image(1) and not seen
    with pytest.raises(ValueError, match="pixels"):
        windows.search(pooled, regions)


def test_hybrid_mode_pools_at_its_own_size_and_crops_without_feature_maps():
    regions = {"query_grid": QUERY_GRID, "query_size": 448, "mode": "crop", "size": 448}
    effnet_index = {"regions": regions, "embedder": {"name": "effnet-lite0", "descriptor": "copy-gem"}}
    assert query_mode(effnet_index, "hybrid") == ("rmac", HYBRID_QUERY_SIZE)
    assert query_mode(effnet_index, "pool") == ("rmac", POOL_QUERY_SIZE)
    assert query_mode(effnet_index, "hybrid", 640) == ("rmac", 640)
    assert query_mode({"regions": regions, "embedder": {"name": "sscd"}}, "hybrid") == ("crop", 448)
    assert 1 <= HYBRID_CROPS < len(parse_grid(QUERY_GRID))
    with pytest.raises(CopyscanError, match="crop, pool or hybrid"):
        query_mode(effnet_index, "rmac")
