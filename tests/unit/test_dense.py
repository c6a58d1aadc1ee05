"""Dense verification (search/verify/dense.py): the correlation and its peak-to-sidelobe ratio, checked against a
brute-force computation; the real network placing a pasted training image; verify_dense on a chunk's rows."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from copyscan.indexing.embed.augment import paste_partial
from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.read.images import open_rgb
from copyscan.search.regions.geometry import box_iou
from copyscan.search.verify.dense import MIN_POSITIONS, DenseMatcher, DenseSpec, verify_dense


def _unit_cells(x: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(x).float(), dim=0)


def test_match_is_the_peak_to_sidelobe_ratio_of_the_mean_cell_cosine():
    rng = np.random.default_rng(0)
    level = _unit_cells(rng.normal(size=(8, 12, 10)))
    template = level[:, 3:7, 5:9].clone()  # a 4 x 4 patch of the level, at row 3, column 5
    other = _unit_cells(rng.normal(size=(8, 9, 11)))  # unrelated cells: a flatter correlation map
    z, box = DenseMatcher.match([other, level], template)
    # brute force: the mean cosine of aligned cells at every offset, then (max - mean) / std (unbiased)
    corr = np.array(
        [
            [float((level[:, y : y + 4, x : x + 4] * template).sum(0).mean()) for x in range(10 - 3)]
            for y in range(12 - 3)
        ]
    )
    assert corr.argmax() == 3 * 7 + 5 and corr.max() == pytest.approx(1.0)
    assert z == pytest.approx((corr.max() - corr.mean()) / corr.std(ddof=1), rel=1e-5)
    # the placement: columns 5..9 of 10, rows 3..7 of 12
    assert box == pytest.approx([5 / 10, 3 / 12, 9 / 10, 7 / 12])
    # the best level wins: the unrelated one fits too (6 x 8 offsets), with a lower z
    assert (9 - 4 + 1) * (11 - 4 + 1) >= MIN_POSITIONS
    z_other, _ = DenseMatcher.match([other], template)
    assert z_other < z


def test_match_skips_levels_without_enough_offsets():
    rng = np.random.default_rng(1)
    template = _unit_cells(rng.normal(size=(8, 4, 4)))
    assert DenseMatcher.match([_unit_cells(rng.normal(size=(8, 4, 20)))], template) is None  # 1 x 17 offsets
    assert DenseMatcher.match([_unit_cells(rng.normal(size=(8, 3, 40)))], template) is None  # too short
    assert DenseMatcher.match([_unit_cells(rng.normal(size=(8, 8, 8)))], template) is not None  # 5 x 5 = 25
    flat = torch.ones(8, 8, 8) / np.sqrt(8)
    assert DenseMatcher.match([flat], flat[:, :4, :4].clone()) is None  # every placement alike: no peak


def test_spec_problems():
    assert DenseSpec().problems() == []
    assert len(DenseSpec(ranks=-1, weight=-1, template_side=100, fractions=(0.5, 1.0)).problems()) == 4


@pytest.fixture(scope="module")
def matcher():
    return DenseMatcher(DenseSpec())


@pytest.fixture(scope="module")
def pasted_scene(real_images):
    """A real image pasted at 35–50 % into a real scene (the partial-copy bench's pasting), its box as
    fractions of the scene, and another real image that is not in the scene."""
    rng = np.random.default_rng(3)
    source, scene, other = (open_rgb(p) for p in real_images[10:13])
    scene.thumbnail((640, 640))
    img, (x0, y0, x1, y1) = paste_partial(source, scene, rng)
    return source, img, [x0 / img.width, y0 / img.height, x1 / img.width, y1 / img.height], other


def test_the_pasted_training_image_stands_out_where_it_was_pasted(matcher, pasted_scene):
    source, scene, box, other = pasted_scene
    pyramid = matcher.pyramid(scene)
    assert len(pyramid) == len(DenseSpec().fractions)
    short = min(scene.size)
    for f, level in zip(DenseSpec().fractions, pyramid, strict=True):  # shorter side template_side / f
        assert min(level.shape[1:]) == -(-round(224 / f) // 16) and level.shape[0] == 112
        assert torch.allclose(level.norm(dim=0), torch.ones(level.shape[1:]), atol=1e-4)
    assert short < 896  # the generation is upsampled for the small fractions, like any other
    z_source, found = matcher.match(pyramid, matcher.template(source))
    z_other, _ = matcher.match(pyramid, matcher.template(other))
    assert z_source > z_other + 2
    assert box_iou(found, box) >= 0.5, (found, box)


def _tar(samples: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_verify_dense_sets_columns_for_selected_rows_and_records_failures(matcher, pasted_scene, tmp_path):
    source, scene, _, other = pasted_scene
    shard = tmp_path / "00000.tar"
    shard.write_bytes(_tar({"a.jpg": _jpeg(source), "b.jpg": _jpeg(other), "c.jpg": b"not an image"}))
    query = tmp_path / "gen.jpg"
    scene.save(query, quality=95)
    manifest = {"embedding_shards": [{"source": str(shard)}]}
    keys = ["a", "b", "c", "gone", "a"]
    table = pa.table(
        {
            "query_id": ["gen.jpg"] * 5,
            "train_key": keys,
            "embedding_shard": pa.array([0] * 5, pa.int32()),
            "query_source": [str(query)] * 5,
            "local_rank": pa.array([0, 1, 2, 3, None], pa.int32()),
            "local_score_norm": pa.array([0.2, 0.3, 0.1, 0.1, None], pa.float32()),
        }
    )
    spec = DenseSpec(ranks=4, limits=DecodeLimits())
    out, stats = verify_dense(table, manifest, "index", spec, matcher=matcher)
    rows = out.to_pylist()
    assert stats["dense_pairs"] == 4 and stats["dense_verified"] == 2 and stats["dense_no_fit"] == 0
    assert stats["dense_errors"] == {"train_key_not_found": 1, "train_not_an_image": 1}
    assert [r["dense_error"] for r in rows] == [None, None, "train_not_an_image", "train_key_not_found", None]
    assert rows[0]["dense_z"] > rows[1]["dense_z"] + 2  # the source, over an image not in the scene
    assert [r["dense_rank"] for r in rows] == [0, 1, None, None, None]  # by dense_z, verified rows only
    for r in rows[:2]:
        assert r["dense_score"] == pytest.approx(r["local_score_norm"] + spec.weight * r["dense_z"], rel=1e-6)
        assert len(r["dense_box"]) == 4
    for r in rows[2:]:  # not verifiable, or not selected (no local rank)
        assert r["dense_z"] is None and r["dense_box"] is None and r["dense_score"] is None
        assert r["dense_rank"] is None
    # only the selected ranks: ranks=1 verifies the best candidate alone
    out1, stats1 = verify_dense(table, manifest, "index", DenseSpec(ranks=1), matcher=matcher)
    assert stats1["dense_pairs"] == 1 and out1["dense_z"].null_count == 4
    assert out1["dense_rank"].to_pylist() == [0, None, None, None, None]
