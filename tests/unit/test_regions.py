"""Region boxes and region descriptors pooled from one forward pass (partial copies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from copyscan.indexing.embed.decode import DecodedBatch
from copyscan.indexing.embed.stage import embed_batches
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import effnet
from copyscan.indexing.models.descriptor import CopyDescriptor, gem
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.models.regions import (
    QUERY_GRID,
    TRAIN_GRID,
    WHOLE,
    RegionSpec,
    box_cells,
    check_train_boxes,
    parse_grid,
)
from copyscan.indexing.store import layout


def test_parse_grid_whole_first_then_positions_edge_to_edge():
    boxes = parse_grid("0.5:2,0.4x0.3:3")
    assert boxes[0] == WHOLE
    assert boxes[1:5] == [
        (0.0, 0.0, 0.5, 0.5),
        (0.5, 0.0, 1.0, 0.5),
        (0.0, 0.5, 0.5, 1.0),
        (0.5, 0.5, 1.0, 1.0),
    ]
    rect = boxes[5:]
    assert len(rect) == 9
    assert rect[0] == (0.0, 0.0, 0.4, 0.3) and rect[-1] == (0.6, 0.7, 1.0, 1.0)
    assert parse_grid("") == [WHOLE] and parse_grid("1:1") == [WHOLE]  # duplicates of the whole image dropped
    assert parse_grid("0.5:1") == parse_grid("0.5") == [WHOLE, (0.25, 0.25, 0.75, 0.75)]  # one: centred
    assert len(parse_grid(TRAIN_GRID)) == 14 and len(parse_grid(QUERY_GRID)) > 14


@pytest.mark.parametrize("spec", ["x:2", "0:2", "1.5:2", "0.5:0", "0.5:two"])
def test_parse_grid_rejects_bad_entries(spec):
    with pytest.raises(CopyscanError, match="region grid entry"):
        parse_grid(spec)


def test_train_boxes_bounded():
    check_train_boxes(parse_grid(TRAIN_GRID))
    with pytest.raises(CopyscanError, match="regions per training image"):
        check_train_boxes(parse_grid("0.1:9"))


def test_box_cells_by_hand():
    # 7 cells: centres at (i + 0.5) / 7
    assert box_cells(WHOLE, 7, 7) == (slice(0, 7), slice(0, 7))
    rows, cols = box_cells((0.0, 0.5, 0.5, 1.0), 7, 7)
    assert (rows, cols) == (slice(3, 7), slice(0, 3))  # cell 3 centre 0.5 lies in [0.5, 1): lower half
    assert box_cells((0.9, 0.9, 0.95, 0.95), 7, 7) == (slice(6, 7), slice(6, 7))  # tiny box: its one cell
    assert box_cells((0.0, 0.0, 0.01, 0.01), 14, 14) == (slice(0, 1), slice(0, 1))


@pytest.fixture(scope="module")
def descriptor() -> CopyDescriptor:
    torch.manual_seed(0)
    return CopyDescriptor(effnet.EfficientNetLite0()).eval()


def test_whole_box_is_the_global_descriptor(descriptor):
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        boxed = descriptor.forward_boxes(x, parse_grid(TRAIN_GRID))
        whole = descriptor(x)
    assert boxed.shape == (3, 14, descriptor.dim)
    torch.testing.assert_close(boxed[:, 0], whole, atol=1e-6, rtol=0)  # summed-area tables: float64 sums
    assert torch.allclose(boxed.norm(dim=-1), torch.ones(3, 14), atol=1e-5)


def test_a_box_pools_exactly_its_cells(descriptor):
    """A box's vector is the descriptor's pooling of the cropped maps: checked against GeM by hand for a
    one-layer, no-R-MAC descriptor."""
    single = CopyDescriptor(descriptor.backbone, layers=("block15",), regions=0, p=3.0).eval()
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    box = (0.5, 0.0, 1.0, 0.45)
    with torch.inference_mode():
        (fmap,) = single.feature_maps(x)[0]
        got = single.forward_boxes(x, [box])[:, 0]
    assert fmap.shape[-2:] == (7, 7)
    want = torch.nn.functional.normalize(gem(fmap[:, :, 0:3, 4:7].float(), 3.0), dim=1)
    assert torch.allclose(got, want, atol=1e-6)


def test_a_pasted_image_is_found_by_the_window_that_covers_it():
    """Real weights: a photo pasted at 40 % into another photo. The cropped query window over it is the
    photo up to resampling; the window pooled from the whole query's maps is much less close (context)."""
    from PIL import Image

    from copyscan.jobs.demo.sample_images import real_image_files

    emb = load_embedder("effnet-lite0", None, "cpu", {})
    paths = real_image_files(2)
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        obj, scene = a.convert("RGB").resize((300, 300)), b.convert("RGB").resize((600, 600))
    pasted = scene.copy()
    pasted.paste(obj.resize((240, 240)), (300, 60))  # box (0.5, 0.1, 0.9, 0.5)
    train = emb.embed(np.stack([emb.preprocess(obj)]))[0]
    spec = RegionSpec(((0.0, 0.0, 1.0, 1.0), (0.5, 0.1, 0.9, 0.5)), size=448)
    pixels = make_preprocess(spec.preprocess_spec(emb.spec["preprocess"]))(pasted)
    cropped = emb.embed_crops(pixels[None], spec.boxes)[0]
    pooled = emb.embed_boxes(pixels[None], spec.boxes)[0]
    # raw (unwhitened) cosines of this descriptor are high even for unrelated images: compare distances
    assert 1 - cropped[1] @ train < 0.01 < 0.03 < 1 - pooled[1] @ train
    assert 1 - cropped[0] @ train > 0.05


def test_embed_batches_regions_from_the_same_pass_and_a_second_size():
    emb = load_embedder("effnet-lite0", None, "cpu", {})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    boxes = tuple(parse_grid("0.6:2"))
    pooled = RegionSpec(boxes, mode="pool")
    same = embed_batches([DecodedBatch(pixels, [{"key": str(i)} for i in range(3)])], emb, pooled)
    assert same.x_regions.shape == (3, 5, emb.dim)
    np.testing.assert_array_equal(same.xb, same.x_regions[:, 0])
    np.testing.assert_allclose(same.xb, emb.embed(pixels), atol=1e-6)
    big = rng.integers(0, 256, (3, 3, 448, 448), dtype=np.uint8)
    batch = DecodedBatch(pixels, [{"key": str(i)} for i in range(3)], region_pixels=big)
    second = embed_batches([batch], emb, RegionSpec(boxes, size=448))
    np.testing.assert_allclose(second.xb, emb.embed(pixels), atol=1e-6)
    np.testing.assert_allclose(second.x_regions, emb.embed_crops(big, boxes), atol=1e-6)
    # a crop is the box cut from the big image and resized to the input size: the whole box is the big image
    # resized, i.e. about the global vector of the small one
    assert float(np.min(np.sum(second.x_regions[:, 0] * emb.embed(pixels), axis=1))) > 0.9
    with pytest.raises(ValueError, match="region_pixels"):
        embed_batches([DecodedBatch(pixels, [{}] * 3)], emb, RegionSpec(boxes, size=448))


# ---------------------------------------------------------------------------------------------------------
# aggregation per training image, and the matches table


def _hits(per_window: list[list[tuple[int, int, int, float]]], n_windows: int):
    """ShardResult of window hits: per window a list of (shard, image row, box, score) with per_image=3."""
    from copyscan.search.ann.topk import ShardResult

    kr = max(len(h) for h in per_window)
    I = np.full((len(per_window), kr), -1, dtype=np.int64)
    D = np.full((len(per_window), kr), -np.inf, dtype=np.float32)
    meta = {}
    for w, hits in enumerate(per_window):
        for j, (shard, row, box, score) in enumerate(hits):
            rid = int(layout.pack_ids(shard, np.array([row * 3 + box]))[0])
            I[w, j], D[w, j] = rid, score
            meta[rid] = {
                "train_key": f"k{shard}-{row}",
                "train_url": f"u{row}",
                "caption": None,
                "index_shard": 0,
                "image_id": int(layout.pack_ids(shard, np.array([row]))[0]),
                "box": box,
            }
    return ShardResult(D, I, D - 0.5, meta, D_norm=D - 0.1)


def test_aggregate_keeps_each_images_best_pair():
    from copyscan.search.regions.result import aggregate

    qboxes, tboxes = [WHOLE, (0, 0, 0.5, 0.5)], [WHOLE, (0, 0, 0.6, 0.6), (0.4, 0.4, 1, 1)]
    # query 0: window 0 sees image (0, 5) box 0 at 0.3; window 1 sees it box 2 at 0.8, and image (1, 2) at 0.6
    # query 1: nothing
    hits = _hits([[(0, 5, 0, 0.3)], [(0, 5, 2, 0.8), (1, 2, 1, 0.6)], [], []], 2)
    local = aggregate(hits, nq=2, n_windows=2, k=3, query_boxes=qboxes, train_boxes=tboxes)
    image_a = int(layout.pack_ids(0, np.array([5]))[0])
    image_b = int(layout.pack_ids(1, np.array([2]))[0])
    assert local.I[0].tolist() == [image_a, image_b, -1]
    np.testing.assert_allclose(local.S[0, :2], [0.8, 0.6], atol=1e-6)
    np.testing.assert_allclose(local.S_norm[0, :2], [0.7, 0.5], atol=1e-6)
    np.testing.assert_allclose(local.S_raw[0, :2], [0.3, 0.1], atol=1e-6)
    assert local.window[0, :2].tolist() == [1, 1] and local.box[0, :2].tolist() == [2, 1]
    assert (local.I[1] == -1).all() and np.isnan(local.S[1]).all()
    assert local.meta[image_a]["train_key"] == "k0-5"


def test_matches_table_adds_local_columns_and_local_only_rows():
    from copyscan.search.ann.topk import ShardResult
    from copyscan.search.regions.result import aggregate
    from copyscan.search.results.matches import MATCHES_SCHEMA, matches_table

    image_a = int(layout.pack_ids(0, np.array([5]))[0])
    image_c = int(layout.pack_ids(0, np.array([9]))[0])
    glob = ShardResult(
        D=np.array([[0.9, 0.2]], np.float32),
        I=np.array([[image_c, image_a]], np.int64),
        D_raw=np.array([[0.95, 0.5]], np.float32),
        meta={
            image_c: {"train_key": "k0-9", "train_url": "u9", "caption": None, "index_shard": 0},
            image_a: {"train_key": "k0-5", "train_url": "u5", "caption": None, "index_shard": 0},
        },
        D_norm=np.array([[0.6, -0.1]], np.float32),
    )
    qboxes, tboxes = [WHOLE, (0.0, 0.0, 0.5, 0.5)], [WHOLE, (0.0, 0.0, 0.6, 0.6), (0.4, 0.4, 1.0, 1.0)]
    local = aggregate(
        _hits([[], [(0, 5, 2, 0.8), (1, 2, 1, 0.6)]], 2),
        nq=1,
        n_windows=2,
        k=2,
        query_boxes=qboxes,
        train_boxes=tboxes,
    )
    records = [{"key": "q0", "url": "file:///q0.png"}]
    table = matches_table(records, glob, 3, {"column": "score_norm", "value": 0.5}, local)
    assert table.schema == MATCHES_SCHEMA
    rows = table.to_pylist()
    assert [(r["train_key"], r["rank"], r["local_rank"]) for r in rows] == [
        ("k0-9", 0, None),  # global only
        ("k0-5", 1, 0),  # both: local columns from its best pair (window 1, region 2)
        ("k1-2", None, 1),  # local only: no global scores, not a global copy
    ]
    both, only = rows[1], rows[2]
    assert both["query_box"] == [0.0, 0.0, 0.5, 0.5] and both["train_box"] == pytest.approx(
        [0.4, 0.4, 1.0, 1.0]
    )
    assert both["local_score"] == pytest.approx(0.8) and both["local_score_norm"] == pytest.approx(0.7)
    assert both["score"] == pytest.approx(0.2) and both["is_copy"] is False
    assert only["score"] is None and only["is_copy"] is False and only["chunk"] == 3
    assert (
        only["train_box"] == pytest.approx([0.0, 0.0, 0.6, 0.6]) and only["query_source"] == "file:///q0.png"
    )
    assert rows[0]["query_box"] is None and rows[0]["is_copy"] is True
