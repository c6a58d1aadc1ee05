"""Localise, then search: frames from (window, region) pairs, the crops they give, sliding windows, and
merging the crops' global hits into region matching's (search/regions/)."""

from __future__ import annotations

import numpy as np
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.regions import WHOLE, parse_slide
from copyscan.indexing.runtime.config import validate
from copyscan.indexing.store import layout
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.geometry import CROP_IOU, REFINE_PAIRS, SLIDE_MAX_AXIS, frames, slide_boxes
from copyscan.search.regions.result import LocalResult, aggregate, crop_boxes, merge_crops
from copyscan.search.regions.windows import LocalWindows
from copyscan.search.scan_config import ScanConfig


def _image(shard: int, row: int) -> int:
    return int(layout.pack_ids(shard, np.array([row]))[0])


def test_frames_by_hand():
    # the query window (0.5, 0.5, 0.7, 0.7) shows the training box (0.5, 0.5, 1, 1): the image is 0.4 wide
    # in the query and its corner at 0.5 - 0.5 * 0.4
    got = frames(np.array([[0.5, 0.5, 0.7, 0.7]]), np.array([[0.5, 0.5, 1.0, 1.0]]))
    np.testing.assert_allclose(got, [[0.3, 0.3, 0.7, 0.7]], atol=1e-6)
    # whole on whole: the query itself; a window showing the whole image: that window
    np.testing.assert_allclose(frames(np.array([WHOLE]), np.array([WHOLE])), [WHOLE])
    np.testing.assert_allclose(
        frames(np.array([[0.1, 0.2, 0.4, 0.6]]), np.array([WHOLE])), [[0.1, 0.2, 0.4, 0.6]]
    )
    # other scales along x and y
    got = frames(np.array([[0.2, 0.2, 0.4, 0.3]]), np.array([[0.0, 0.5, 0.5, 1.0]]))
    np.testing.assert_allclose(got, [[0.2, 0.1, 0.6, 0.3]], atol=1e-6)


def _hits(pairs: list[list[tuple[int, int, int, float]]], per_image: int) -> ShardResult:
    """pairs[w] = [(shard, row, box, score)] for window w of one query."""
    kr = max(len(p) for p in pairs)
    I = np.full((len(pairs), kr), -1, np.int64)
    D = np.full((len(pairs), kr), np.nan, np.float32)
    meta = {}
    for w, hits in enumerate(pairs):
        for j, (shard, row, box, score) in enumerate(hits):
            rid = int(layout.pack_ids(shard, np.array([row * per_image + box]))[0])
            I[w, j], D[w, j] = rid, score
            meta[rid] = {"train_key": f"k{row}", "train_url": "u", "caption": None, "index_shard": 0}
    return ShardResult(D, I, D, meta, D_norm=D)


def test_aggregate_frame_is_the_median_over_the_images_best_pairs():
    tboxes = [WHOLE, (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]
    # windows 1-3 each show one quarter box of image 7; three of them say its frame is (0.2, 0.2, 0.6, 0.6),
    # the worst-scoring one says (0.0, 0.0, 0.4, 0.4); window 0 sees another image
    qboxes = [WHOLE, (0.2, 0.2, 0.4, 0.4), (0.4, 0.4, 0.6, 0.6), (0.2, 0.2, 0.4, 0.4), (0.2, 0.2, 0.4, 0.4)]
    hits = _hits(
        [[(0, 3, 0, 0.1)], [(0, 7, 1, 0.9)], [(0, 7, 2, 0.8)], [(0, 7, 1, 0.7)], [(0, 7, 2, 0.2)]],
        len(tboxes),
    )
    local = aggregate(hits, nq=1, n_windows=5, k=2, query_boxes=qboxes, train_boxes=tboxes)
    assert local.I[0].tolist() == [_image(0, 7), _image(0, 3)]
    np.testing.assert_allclose(local.frame[0, 0], [0.2, 0.2, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(local.qbox[0, 0], qboxes[1])
    np.testing.assert_allclose(local.tbox[0, 0], tboxes[1])
    np.testing.assert_allclose(local.frame[0, 1], WHOLE)
    assert local.crop is None
    assert REFINE_PAIRS >= 4


def _local(frames_: list[list[tuple[float, float, float, float]]]) -> LocalResult:
    nq, k = len(frames_), max(len(f) for f in frames_)
    out = LocalResult(
        I=np.full((nq, k), -1, np.int64),
        S=np.full((nq, k), np.nan, np.float32),
        S_norm=np.full((nq, k), np.nan, np.float32),
        S_raw=np.full((nq, k), np.nan, np.float32),
        window=np.zeros((nq, k), np.int32),
        box=np.zeros((nq, k), np.int32),
        meta={},
        query_boxes=[WHOLE],
        train_boxes=[WHOLE],
        qbox=np.full((nq, k, 4), np.nan, np.float32),
        tbox=np.full((nq, k, 4), np.nan, np.float32),
        frame=np.full((nq, k, 4), np.nan, np.float32),
    )
    for q, fs in enumerate(frames_):
        for r, f in enumerate(fs):
            image = _image(0, 10 * q + r)
            out.I[q, r], out.frame[q, r] = image, f
            out.S[q, r] = out.S_norm[q, r] = out.S_raw[q, r] = 0.5 - 0.1 * r
            out.qbox[q, r], out.tbox[q, r] = (0.1, 0.1, 0.3, 0.3), (0.0, 0.0, 0.5, 0.5)
            out.meta[image] = {
                "train_key": f"k{10 * q + r}",
                "train_url": "u",
                "caption": None,
                "index_shard": 0,
            }
    return out


def test_crop_boxes_clip_drop_small_and_repeated_ones():
    local = _local(
        [
            [
                (-0.2, 0.1, 0.5, 0.6),  # clipped to (0, 0.1, 0.5, 0.6)
                (0.0, 0.1, 0.5, 0.62),  # the same crop again (IoU >= CROP_IOU): dropped
                (0.5, 0.5, 0.52, 0.9),  # 2 % wide: dropped
                (-0.5, -0.5, 1.4, 1.3),  # the whole query, which the global search has searched: dropped
                (0.6, 0.0, 1.0, 0.4),
            ],
            [(0.1, 0.1, 0.4, 0.4)],
        ]
    )
    boxes = crop_boxes(local, 5)
    assert boxes.shape == (2, 5, 4)
    np.testing.assert_allclose(boxes[0, 0], [0.0, 0.1, 0.5, 0.6], atol=1e-6)
    np.testing.assert_allclose(boxes[0, 1], [0.6, 0.0, 1.0, 0.4], atol=1e-6)
    assert np.isnan(boxes[0, 2:]).all() and np.isnan(boxes[1, 1:]).all()
    np.testing.assert_allclose(boxes[1, 0], [0.1, 0.1, 0.4, 0.4], atol=1e-6)
    # only the best m images give crops
    assert np.isfinite(crop_boxes(local, 1)[0, 0]).all() and crop_boxes(local, 1).shape == (2, 1, 4)
    assert CROP_IOU < 1


def test_merge_crops_adds_each_images_best_crop_score_to_its_region_score():
    local = _local([[(0.1, 0.1, 0.5, 0.5), (0.5, 0.5, 0.9, 0.9)], [(0.2, 0.2, 0.6, 0.6)]])
    a, b, c = _image(0, 0), _image(0, 1), _image(0, 10)  # region scores: a 0.5, b 0.4; c 0.5
    new = _image(3, 4)
    boxes = crop_boxes(local, 2)  # query 0: two crops; query 1: one
    # query 0's first crop finds a new image at 0.3 and image b at 0.35; its second finds b at 0.2 (b keeps
    # its best, 0.35) and a at -0.1 (clipped to 0); query 1's crop finds c at 0.05
    hits = ShardResult(
        D=np.array([[0.5, 0.45], [0.3, 0.1], [0.2, -1]], np.float32),
        I=np.array([[new, b], [b, a], [c, -1]], np.int64),
        D_raw=np.array([[0.95, 0.9], [0.8, 0.7], [0.85, 0]], np.float32),
        meta={new: {"train_key": "new", "train_url": "u", "caption": None, "index_shard": 1}},
        D_norm=np.array([[0.3, 0.35], [0.2, -0.1], [0.05, np.nan]], np.float32),
    )
    out = merge_crops(local, boxes, hits)
    # b 0.4 + 0.35; new: the lowest region score kept (0.4) + 0.3; a 0.5 + 0; k = 2
    assert out.I[0].tolist() == [b, new]
    np.testing.assert_allclose(out.S_norm[0], [0.75, 0.7], atol=1e-6)
    np.testing.assert_allclose(out.crop[0], [0.35, 0.3], atol=1e-6)
    np.testing.assert_allclose(out.crop_box[0], boxes[0, :1].repeat(2, 0))
    # b keeps its region pair's cosine and boxes; new (a crop only) has the crop's, against the whole image
    np.testing.assert_allclose(out.S[0], [0.4, 0.5], atol=1e-6)
    np.testing.assert_allclose(out.S_raw[0], [0.4, 0.95], atol=1e-6)
    np.testing.assert_allclose(out.qbox[0, 0], [0.1, 0.1, 0.3, 0.3])
    np.testing.assert_allclose(out.tbox[0, 0], [0, 0, 0.5, 0.5])
    np.testing.assert_allclose(out.qbox[0, 1], boxes[0, 0])
    np.testing.assert_allclose(out.tbox[0, 1], WHOLE)
    assert out.meta[new]["train_key"] == "new"
    # query 1: c 0.5 + 0.05
    assert out.I[1].tolist() == [c, -1] and out.S_norm[1, 0] == pytest.approx(0.55)
    assert np.isnan(out.S_norm[1, 1]) and np.isnan(out.crop[1, 1])
    # a query whose crops find nothing keeps region matching's ranking, with no crop scores
    none = ShardResult(
        np.full((3, 2), np.nan, np.float32), np.full((3, 2), -1, np.int64), np.zeros((3, 2), np.float32), {},
        D_norm=np.full((3, 2), np.nan, np.float32),
    )  # fmt: skip
    same = merge_crops(local, boxes, none)
    np.testing.assert_array_equal(same.I, local.I)
    np.testing.assert_allclose(same.S_norm, local.S_norm)
    assert np.isnan(same.crop).all()
    # the input is left as it was
    assert local.I[0].tolist() == [a, b] and local.crop is None
    with pytest.raises(ValueError, match="crop results"):
        merge_crops(
            local, boxes, ShardResult(hits.D[:2], hits.I[:2], hits.D_raw[:2], hits.meta, hits.D_norm[:2])
        )


def test_refine_result_embeds_the_crops_and_searches_them():
    local = _local([[(0.1, 0.1, 0.5, 0.5)], [(-0.5, -0.5, 1.5, 1.5)]])  # query 1: only the whole query
    windows = LocalWindows(spec=None, manifest={}, train_boxes=[WHOLE], normalise=None, k=1, refine=3)
    pixels = np.zeros((2, 3, 8, 8), np.uint8)
    seen = {}

    def embed(px, boxes):
        seen["boxes"] = boxes
        return np.ones((*boxes.shape[:2], 4), np.float32)

    def search(x):
        seen["x"] = x
        return ShardResult(
            np.array([[0.9]], np.float32),
            np.array([[_image(2, 2)]], np.int64),
            np.array([[0.9]], np.float32),
            {_image(2, 2): {"train_key": "found", "train_url": "u", "caption": None, "index_shard": 0}},
            D_norm=np.array([[0.8]], np.float32),
        )

    out = windows.refine_result(local, pixels, embed, search)
    assert seen["boxes"].shape == (2, 3, 4) and seen["x"].shape == (1, 4)  # one crop searched
    # query 0: the crop's image (0.5, the lowest region score, + 0.8) beats region matching's (0.5)
    assert out.I[:, 0].tolist() == [_image(2, 2), local.I[1, 0]]
    np.testing.assert_allclose(out.crop[:, 0], [0.8, np.nan])
    # nothing to crop: nothing embedded
    seen.clear()
    assert windows.refine_result(_local([[(-1, -1, 2, 2)]]), pixels[:1], embed, search).I.shape == (1, 1)
    assert not seen


def test_embed_crops_each_is_embed_crops_per_image():
    emb = load_embedder("effnet-lite0", None, "cpu", {})
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)
    boxes = np.full((2, 3, 4), np.nan, np.float32)
    boxes[0, 0] = (0.1, 0.2, 0.6, 0.9)
    boxes[0, 2] = (0.0, 0.0, 1.0, 1.0)
    boxes[1, 1] = (0.5, 0.5, 0.9, 0.8)
    got = emb.embed_crops_each(pixels, boxes)
    assert got.shape == (2, 3, emb.dim)
    np.testing.assert_allclose(got[0, 0], emb.embed_crops(pixels[:1], [boxes[0, 0]])[0, 0], atol=1e-5)
    np.testing.assert_allclose(got[0, 2], emb.embed_crops(pixels[:1], [boxes[0, 2]])[0, 0], atol=1e-5)
    np.testing.assert_allclose(got[1, 1], emb.embed_crops(pixels[1:], [boxes[1, 1]])[0, 0], atol=1e-5)
    assert np.isnan(got[0, 1]).all() and np.isnan(got[1, 0]).all() and np.isnan(got[1, 2]).all()
    assert np.isnan(emb.embed_crops_each(pixels, np.full((2, 1, 4), np.nan))).all()


def test_slide_boxes_are_squares_a_third_of_a_side_apart():
    # square query, side 0.5: starts 0, 0.17, 0.34 (0.34 of the side apart) and 0.5, flush with the edge
    square = slide_boxes([0.5], 100, 100)
    assert square.shape == (16, 4)
    np.testing.assert_allclose(square[:4, 0], [0.0, 0.17, 0.34, 0.5], atol=1e-6)
    np.testing.assert_allclose(square[0], [0.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(square[-1], [0.5, 0.5, 1.0, 1.0])
    # 2:1 query: squares in its pixels (50 x 50 px), 0.25 of the width wide, 10 along x, 4 along y
    wide = slide_boxes([0.5], 200, 100)
    assert wide.shape == (40, 4)
    np.testing.assert_allclose((wide[:, 2] - wide[:, 0]) * 200, 50, rtol=1e-5)
    np.testing.assert_allclose((wide[:, 3] - wide[:, 1]) * 100, 50, rtol=1e-5)
    assert wide[:, 2].max() == pytest.approx(1.0) and wide[:, 0].min() == 0.0
    # two sides, row by row; side 1 of a square query is the query
    both = slide_boxes([1.0, 0.5], 100, 100)
    assert both.shape == (17, 4)
    np.testing.assert_allclose(both[0], WHOLE)
    # a panorama stays bounded: at most SLIDE_MAX_AXIS windows along an axis, spread evenly to the edge
    pano = slide_boxes([0.5], 1000, 100)
    assert pano.shape == (4 * SLIDE_MAX_AXIS, 4)  # 4 rows of SLIDE_MAX_AXIS
    np.testing.assert_allclose(np.diff(pano[:SLIDE_MAX_AXIS, 0]), 0.95 / (SLIDE_MAX_AXIS - 1), rtol=1e-5)
    assert slide_boxes([], 100, 100).shape == (0, 4)
    # rectangles: 0.5 x 0.25 of the shorter side of a 200 x 100 query is 50 x 25 px, i.e. 0.25 of each
    # dimension, each axis stepping 0.34 of its own extent (0.085): 10 starts along x and 10 along y
    rect = slide_boxes([(0.5, 0.25)], 200, 100)
    np.testing.assert_allclose((rect[:, 2] - rect[:, 0]) * 200, 50, rtol=1e-5)
    np.testing.assert_allclose((rect[:, 3] - rect[:, 1]) * 100, 25, rtol=1e-5)
    assert rect.shape == (10 * 10, 4)
    np.testing.assert_allclose(rect[:4, 0], [0.0, 0.085, 0.17, 0.255], atol=1e-6)
    np.testing.assert_allclose(rect[-1], [0.75, 0.75, 1.0, 1.0], atol=1e-6)
    tall = slide_boxes([(0.25, 0.5)], 100, 100)  # 25 x 50 px on a square query
    np.testing.assert_allclose(tall[0], [0.0, 0.0, 0.25, 0.5])
    assert tall.shape == (10 * 4, 4)
    # a pair equal on both sides is the square of that side
    np.testing.assert_allclose(slide_boxes([(0.5, 0.5)], 200, 100), wide)


def test_parse_slide_and_its_config_check():
    assert parse_slide("0.5, 0.4") == ((0.5, 0.5), (0.4, 0.4))
    assert parse_slide("0.5x0.25,0.25X0.5") == ((0.5, 0.25), (0.25, 0.5))
    assert parse_slide("") == ()
    for bad in ("1.5", "0", "half", "0.5x", "0.5x1.2", "0.2x0.2x0.2"):
        with pytest.raises(CopyscanError, match="region_slide"):
            parse_slide(bad)
    with pytest.raises(CopyscanError, match="region_slide"):
        validate(ScanConfig(index="i", queries="q", out="o", region_slide="0.5,2"))
    validate(ScanConfig(index="i", queries="q", out="o", region_slide=""))


def test_refine_result_searches_the_sliding_windows_with_the_frames():
    local = _local([[(0.1, 0.1, 0.5, 0.5)], [(-0.5, -0.5, 1.5, 1.5)]])  # query 1: no frame to crop
    windows = LocalWindows(
        spec=None, manifest={}, train_boxes=[WHOLE], normalise=None, k=2, refine=1, slide=(0.5,)
    )
    assert windows.crops
    pixels = np.zeros((2, 3, 8, 8), np.uint8)
    seen = {}
    pasted = _image(3, 7)

    def embed(px, boxes):
        seen["boxes"] = boxes
        return np.ones((*boxes.shape[:2], 4), np.float32)

    def search(x):
        # every crop finds nothing but `pasted`, weakly; query 1's window 5 finds it well
        n = len(x)
        D_norm = np.full((n, 1), 0.05, np.float32)
        D_norm[1 + 16 + 5] = 0.6  # rows: query 0's frame, its 16 windows, then query 1's 16 windows
        meta = {pasted: {"train_key": "pasted", "train_url": "u", "caption": None, "index_shard": 3}}
        return ShardResult(D_norm + 0.3, np.full((n, 1), pasted, np.int64), D_norm + 0.2, meta, D_norm=D_norm)

    out = windows.refine_result(local, pixels, embed, search, sizes=[(100, 100), (100, 100)])
    # query 0: its frame then 16 windows; query 1: no frame, 16 windows (a NaN row where the frame was)
    assert seen["boxes"].shape == (2, 17, 4)
    assert np.isnan(seen["boxes"][1, 0]).all()
    np.testing.assert_allclose(seen["boxes"][1, 1:], slide_boxes([0.5], 100, 100))
    # query 1: region matching's image (0.5) loses to the window's (its lowest region score 0.5 + 0.6)
    assert out.I[1, 0] == pasted
    assert out.S_norm[1, 0] == pytest.approx(1.1)
    np.testing.assert_allclose(out.crop_box[1, 0], slide_boxes([0.5], 100, 100)[5])
    np.testing.assert_allclose(out.qbox[1, 0], out.crop_box[1, 0])
    with pytest.raises(ValueError, match="sizes"):
        windows.refine_result(local, pixels, embed, search)
