"""Query windows pooled from one forward pass (``region_query_mode=pool``, RegionSpec mode "rmac")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from copyscan.indexing.embed.decode import DecodedBatch
from copyscan.indexing.embed.stage import embed_batches
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import effnet
from copyscan.indexing.models.descriptor import CopyDescriptor
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.models.regions import (
    POOL_QUERY_SIZE,
    QUERY_GRID,
    RegionSpec,
    box_cells,
    parse_grid,
    query_mode,
)


@pytest.mark.parametrize("regions", [2, 0])
def test_pooled_boxes_are_the_descriptors_pooling_of_each_boxs_cells(regions):
    """The summed-area pooling of all boxes at once equals ``pool`` on each box's cropped maps (R-MAC
    regions and plain GeM), on a map size that is not square."""
    torch.manual_seed(0)
    descriptor = CopyDescriptor(effnet.EfficientNetLite0(), regions=regions).eval()
    x = torch.randint(0, 256, (2, 3, 320, 448), dtype=torch.uint8)
    boxes = parse_grid("0.3:4,0.2:3,0.45x0.25:2")
    with torch.inference_mode():
        maps = descriptor.feature_maps(x)
        got = descriptor.pool_boxes(maps, boxes)
        want = []
        for box in boxes:
            cut = [[f[:, :, slice(*box_cells(box, *f.shape[-2:])[0].indices(f.shape[-2])[:2]),
                      slice(*box_cells(box, *f.shape[-2:])[1].indices(f.shape[-1])[:2])] for f in layer]
                   for layer in maps]  # fmt: skip
            want.append(descriptor.pool(cut))
    assert got.shape == (2, len(boxes), descriptor.dim)
    torch.testing.assert_close(got, torch.stack(want, dim=1), atol=2e-6, rtol=0)


def test_embed_batches_pools_windows_from_one_pass_at_the_region_size():
    emb = load_embedder("effnet-lite0", None, "cpu", {})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    big = rng.integers(0, 256, (2, 3, 448, 448), dtype=np.uint8)
    boxes = tuple(parse_grid("0.3:3"))
    spec = RegionSpec(boxes, size=448, mode="rmac")
    assert spec.preprocess_spec(emb.spec["preprocess"])["size"] == 448  # decoded a second time at 448
    batch = DecodedBatch(pixels, [{"key": str(i)} for i in range(2)], region_pixels=big)
    out = embed_batches([batch], emb, spec, keep_pixels=True)
    np.testing.assert_allclose(out.xb, emb.embed(pixels), atol=1e-6)
    np.testing.assert_allclose(out.x_regions, emb.embed_boxes(big, boxes), atol=1e-6)
    np.testing.assert_array_equal(out.region_pixels, big)  # the frames are cropped from them later
    with pytest.raises(ValueError, match="region_pixels"):
        embed_batches([DecodedBatch(pixels, [{}] * 2)], emb, spec)


def test_a_pooled_window_over_a_pasted_photo_is_nearer_its_source_than_the_scene():
    """Real weights: a photo pasted at 40 % into another photo; the window over it, pooled from one pass
    at POOL_QUERY_SIZE, is nearer the photo than the whole query and the window beside it."""
    from PIL import Image

    from copyscan.jobs.demo.sample_images import real_image_files

    emb = load_embedder("effnet-lite0", None, "cpu", {})
    paths = real_image_files(2)
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        obj, scene = a.convert("RGB").resize((300, 300)), b.convert("RGB").resize((600, 600))
    pasted = scene.copy()
    pasted.paste(obj.resize((240, 240)), (300, 60))  # box (0.5, 0.1, 0.9, 0.5)
    train = emb.embed(np.stack([emb.preprocess(obj)]))[0]
    spec = RegionSpec(
        ((0.0, 0.0, 1.0, 1.0), (0.5, 0.1, 0.9, 0.5), (0.1, 0.5, 0.5, 0.9)), POOL_QUERY_SIZE, "rmac"
    )
    pixels = make_preprocess(spec.preprocess_spec(emb.spec["preprocess"]))(pasted)
    whole, window, beside = emb.embed_boxes(pixels[None], spec.boxes)[0] @ train
    assert window > max(whole, beside) + 0.02, (whole, window, beside)


def test_query_mode_pools_where_the_embedder_can_and_crops_elsewhere():
    regions = {"query_grid": QUERY_GRID, "query_size": 448, "mode": "crop", "size": 448}
    effnet_index = {"regions": regions, "embedder": {"name": "effnet-lite0", "descriptor": "copy-gem"}}
    sscd_index = {"regions": regions, "embedder": {"name": "sscd"}}
    assert query_mode(effnet_index, "pool") == ("rmac", POOL_QUERY_SIZE)
    assert query_mode(effnet_index, "pool", 896) == ("rmac", 896)
    assert query_mode(effnet_index, "crop") == ("crop", 448)
    assert query_mode(sscd_index, "pool") == ("crop", 448)  # no feature maps to pool: crops
    # the split product's aligned boxes are cropped from the same pixels as the windows: the regions' size
    assert query_mode(effnet_index, "pool", split_product=True) == ("rmac", 448)
    with pytest.raises(CopyscanError, match="region_query_mode"):
        query_mode(effnet_index, "dense")
