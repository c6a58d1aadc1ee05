"""bench.window_lab's window choices: the rows a choice replaces, the images voted for, the tile of a box."""

import numpy as np

from bench.window_lab import TILE, _tile_of, cropped, voted
from copyscan.search.ann.topk import ShardResult

PER_IMAGE = 2  # region ids: image · 2 + box


def hits(I: np.ndarray, D: np.ndarray) -> ShardResult:
    I, D = np.asarray(I, np.int64), np.asarray(D, np.float32)
    return ShardResult(D, I, D.copy(), {}, D_norm=D.copy())


def test_voted_adds_each_images_best_score_per_window():
    # one query, 3 windows, 2 hits each. Image 5 (regions 10, 11) is no window's best hit but second in all
    # three: 0.15 + 0.14 + 0.13 = 0.42, more than image 1's 0.30 (window 0), image 3's 0.25 (window 2)
    I = [[2, 10], [4, 11], [6, 10]]
    D = [[0.30, 0.15], [0.20, 0.14], [0.25, 0.13]]
    # each image's best window: image 5's is window 0 (0.15), image 1's window 0, image 3's window 2
    assert voted(hits(I, D), 1, 3, PER_IMAGE, 3) == [[0, 0, 2]]


def test_voted_counts_an_image_once_per_window_and_skips_negative_scores():
    # window 0 holds two regions of image 5 (10, 11): only the better counts; image 1's only hit is negative
    I = [[10, 11], [2, -1]]
    D = [[0.10, 0.09], [-0.2, np.nan]]
    h = hits(I, D)
    assert voted(h, 1, 2, PER_IMAGE, 2) == [[0, 1]]  # image 5 (0.10), then image 1 (0.0) from window 1


def test_cropped_replaces_the_chosen_rows_per_query():
    pooled = hits(np.arange(8).reshape(4, 2) * 2, np.full((4, 2), 0.1))  # 2 queries × 2 windows
    crops = hits(np.arange(8).reshape(4, 2) * 2 + 100, np.full((4, 2), 0.5))
    out = cropped(pooled, crops, [[1], [0, 0]], 2)
    assert out.I[:, 0].tolist() == [0, 104, 108, 12]  # query 0's window 1 (row 1), query 1's window 0 (row 2)
    assert out.D_norm[:, 0].tolist() == [np.float32(0.1), np.float32(0.5), np.float32(0.5), np.float32(0.1)]


def test_a_box_goes_to_the_tile_that_holds_it_with_the_most_margin():
    pos = np.linspace(0, 1 - TILE, 3)
    tiles = [(x, y, x + TILE, y + TILE) for y in pos for x in pos]
    assert _tile_of((0.0, 0.0, 0.3, 0.3), tiles) == 0
    assert _tile_of((0.35, 0.35, 0.65, 0.65), tiles) == 4  # the centre tile
    assert _tile_of((0.7, 0.7, 1.0, 1.0), tiles) == 8
    # held by none (wider than a tile): the one it overlaps most
    assert _tile_of((0.0, 0.4, 1.0, 0.6), tiles) in (3, 4, 5)
