"""Pixel distances (ℓ2, tiled ℓ2) and pixel verification of matches, on real images with planted copies."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_decode import _tar

from copyscan.indexing.read.images import open_rgb
from copyscan.search.results.matches import MATCHES_SCHEMA
from copyscan.search.verify import pixel
from copyscan.search.verify.matches import VerifySpec, verify_matches


def _reference(a: np.ndarray, b: np.ndarray, tiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pair and per tile, in float64 with explicit loops: the definition, written out."""
    a = a.astype(np.float64) / 255.0
    b = b.astype(np.float64) / 255.0
    n, size = a.shape[:2]
    side = size // tiles
    l2 = np.sqrt(((a - b) ** 2).reshape(n, -1).mean(axis=1))
    tiled = np.zeros(n)
    for i in range(n):
        for ty in range(tiles):
            for tx in range(tiles):
                block = (a[i] - b[i])[ty * side : (ty + 1) * side, tx * side : (tx + 1) * side]
                tiled[i] = max(tiled[i], np.sqrt((block**2).mean()))
    return l2, tiled


def _base(path, size=512) -> np.ndarray:
    """A real image, aligned, its range squeezed into [50, 205] so planted offsets never clip."""
    x = pixel.align(open_rgb(path), size).astype(np.int32)
    return (50 + x * 155 // 255).astype(np.uint8)


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "PNG")
    return buf.getvalue()


def _planted(base: np.ndarray) -> dict[str, tuple[np.ndarray, float, float]]:
    """Near-copies of ``base`` with their ℓ2 and tiled ℓ2 known analytically: name → (image, l2, tiled)."""
    x = base.astype(np.int32)
    one_tile = x.copy()
    one_tile[128:256, 256:384] += 12  # one of the 16 tiles moved by 12/255
    sign = np.where((np.indices(x.shape[:2]).sum(0) % 2) == 0, 1, -1)[..., None]
    return {
        "one_tile": (one_tile.astype(np.uint8), 12 / 255 / 4, 12 / 255),
        "checker_30": ((x + 30 * sign).astype(np.uint8), 30 / 255, 30 / 255),
        "offset_45": ((x + 45).astype(np.uint8), 45 / 255, 45 / 255),
    }


def test_distances_match_the_definition(real_images):
    rng = np.random.default_rng(0)
    a = np.stack([pixel.align(open_rgb(p), 64) for p in real_images[:6]])
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    b[3] = a[4]  # and one pair of different images
    l2, tiled = pixel.pixel_distances(a, b, tiles=4)
    ref_l2, ref_tiled = _reference(a, b, 4)
    np.testing.assert_allclose(l2, ref_l2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tiled, ref_tiled, rtol=1e-5, atol=1e-6)
    assert (tiled >= l2 - 1e-6).all()  # the max tile is never below the mean
    # float inputs in [0, 1] give the same numbers as uint8 ones
    l2_f, tiled_f = pixel.pixel_distances(a / 255.0, b / 255.0, tiles=4)
    np.testing.assert_allclose(tiled_f, tiled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        pixel.pixel_distances(a[:, :63, :63], b[:, :63, :63], tiles=4)


def test_planted_copies_have_their_known_distances(real_images):
    base = _base(real_images[0])
    names, copies, expected = [], [], []
    for name, (img, l2, tiled) in _planted(base).items():
        names.append(name)
        copies.append(img)
        expected.append((l2, tiled))
    l2, tiled = pixel.pixel_distances(np.stack([base] * len(copies)), np.stack(copies))
    for i, (exp_l2, exp_tiled) in enumerate(expected):
        assert l2[i] == pytest.approx(exp_l2, abs=1e-5), names[i]
        assert tiled[i] == pytest.approx(exp_tiled, abs=1e-5), names[i]


def test_pairwise_tiled_equals_pair_by_pair(real_images):
    rng = np.random.default_rng(1)
    x = np.stack([pixel.align(open_rgb(p), 128) for p in real_images[:8]])
    x = np.concatenate(
        [x, np.clip(x[:3].astype(int) + rng.integers(-8, 9, x[:3].shape), 0, 255).astype(np.uint8)]
    )
    D = pixel.pairwise_tiled(x)
    i, j = np.triu_indices(len(x), 1)
    _, tiled = pixel.pixel_distances(x[i], x[j])
    np.testing.assert_allclose(D[i, j], tiled, atol=2e-3)  # matrix-product form: float32 rounding only
    assert (np.diag(D) == 0).all() and (D == D.T).all()
    assert D[0, 8] < 0.05 < D[0, 1]  # a noisy copy is near its image, another image is not


def test_alignment_crop_squash_and_transparency(real_images):
    img = open_rgb(real_images[0])
    wide = img.resize((300, 150))
    crop = pixel.align(wide, 64, "crop")
    squash = pixel.align(wide, 64, "squash")
    assert crop.shape == squash.shape == (64, 64, 3) and crop.dtype == np.uint8
    # crop keeps the middle half of the width: equal to squashing that half
    middle = pixel.align(wide.crop((75, 0, 225, 150)), 64, "squash")
    assert np.abs(crop.astype(int) - middle.astype(int)).mean() < 2
    transparent = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert (pixel.align(transparent, 8) == 255).all()  # composited on white
    loaded = pixel.load_pixels(_png(crop), 64)
    assert loaded.dtype == np.float32 and loaded.max() <= 1.0
    np.testing.assert_allclose(loaded, crop / 255.0, atol=1e-6)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _pil_align(img: Image.Image, size: int) -> np.ndarray:
    """The alignment written with PIL's own bicubic resize, on a full-resolution decode."""
    rgb = img.convert("RGB")
    scale = size / min(rgb.size)
    new_w, new_h = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    resized = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize(
    ("source", "size", "bound"),
    [
        ((640, 480), 512, 0.001),
        ((1600, 1200), 512, 0.01),
        ((700, 1100), 256, 0.02),
        ((1600, 1200), 128, 0.03),
    ],
)
def test_one_reduced_decode_stays_close_to_full_decode(real_images, source, size, bound):
    """decode_pixels (one JPEG decode at the smallest DCT reduction still >= size, torch resize) against
    a full-resolution decode resized by PIL: measured at most 0.0003 / 0.008 / 0.016 / 0.023 tiled ℓ2."""
    worst = 0.0
    for path in real_images[:4]:
        data = _jpeg(open_rgb(path).resize(source))
        fast = pixel.decode_pixels(data, size)
        reference = _pil_align(Image.open(io.BytesIO(data)), size)
        assert fast.shape == (size, size, 3) and fast.dtype == np.uint8 and fast.flags.c_contiguous
        worst = max(worst, float(pixel.pixel_distances(fast[None], reference[None])[1][0]))
        # the resize alone (same decode): torch's kernel is PIL's filter up to rounding
        same_decode = pixel.align(Image.open(io.BytesIO(data)), size)
        assert np.abs(same_decode.astype(int) - _pil_align(Image.open(io.BytesIO(data)), size)).max() <= 2
    assert worst < bound


def test_reduced_decode_keeps_limits_and_truncation_checks(real_images):
    from copyscan.indexing.embed.decode import DecodeLimits, Rejected, decode_image

    data = _jpeg(open_rgb(real_images[1]).resize((1600, 1200)))
    assert decode_image(data, DecodeLimits(), draft=(512, 512)).size == (800, 600)  # ½ scale, one decode
    with pytest.raises(Rejected) as too_large:  # the stored size counts, not the reduced one
        pixel.decode_pixels(data, 128, limits=DecodeLimits(max_pixels=1_000_000))
    assert too_large.value.reason == "too_large"
    with pytest.raises(Rejected) as truncated:
        pixel.decode_pixels(data[: len(data) // 2], 128)
    assert truncated.value.reason == "truncated"


def test_reduced_decode_keeps_copies_apart_from_other_images(real_images):
    """At δ = 0.15 a JPEG'd near-copy of a large training JPEG still verifies and other images do not."""
    train = [open_rgb(p).convert("RGB").resize((1600, 1200)) for p in real_images[:6]]
    rng = np.random.default_rng(2)
    copies = [
        np.clip(_pil_align(im, 512).astype(int) + rng.integers(-8, 9, (512, 512, 3)), 0, 255).astype(np.uint8)
        for im in train
    ]
    a = np.stack([pixel.decode_pixels(_jpeg(im), 512) for im in train])
    b = np.stack([pixel.decode_pixels(_jpeg(Image.fromarray(c)), 512) for c in copies])
    _, same = pixel.pixel_distances(a, b)
    _, other = pixel.pixel_distances(a, np.roll(b, 1, axis=0))
    assert same.max() < 0.05 and other.min() > 0.15


def _matches(rows):
    full = [{f.name: None for f in MATCHES_SCHEMA} | row for row in rows]
    return pa.Table.from_pylist(full, MATCHES_SCHEMA)


def test_verify_matches_sets_distances_and_reasons(real_images, tmp_path):
    bases = [_base(p) for p in real_images[:3]]
    shard = str(tmp_path / "00000.tar")
    _tar(shard, [(f"{i:09d}.png", _png(b)) for i, b in enumerate(bases)] + [("000000009.txt", b"no image")])
    planted = _planted(bases[0])
    rows, expected = [], {}
    for name, (img, l2, tiled) in planted.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(_png(img))
        rows.append(
            {"query_id": f"{name}.png", "query_source": str(path), "rank": 0, "train_key": "000000000"}
        )
        expected[f"{name}.png"] = (l2, tiled)
        # rank 1: another training image, verified too (verify_pixels=2)
        rows.append(
            {"query_id": f"{name}.png", "query_source": str(path), "rank": 1, "train_key": "000000001"}
        )
        rows.append(
            {"query_id": f"{name}.png", "query_source": str(path), "rank": 2, "train_key": "000000002"}
        )
    (tmp_path / "truncated.png").write_bytes(_png(bases[1])[:500])
    rows += [
        {
            "query_id": "truncated.png",
            "query_source": str(tmp_path / "truncated.png"),
            "rank": 0,
            "train_key": "000000001",
        },
        {
            "query_id": "one_tile.png",
            "query_source": str(tmp_path / "one_tile.png"),
            "rank": 0,
            "train_key": "000000077",
        },
        {
            "query_id": "one_tile.png",
            "query_source": str(tmp_path / "one_tile.png"),
            "rank": 0,
            "train_key": "000000009",
        },
    ]
    rows = [r | {"embedding_shard": 0} for r in rows]
    manifest = {"embedding_shards": [{"source": shard}]}
    table, stats = verify_matches(_matches(rows), manifest, "idx", VerifySpec(ranks=2))
    assert table.schema.equals(MATCHES_SCHEMA) and table.num_rows == len(rows)
    got = table.to_pylist()
    for row in got:
        if row["train_key"] == "000000000":
            exp_l2, exp_tiled = expected[row["query_id"]]
            assert row["pixel_l2"] == pytest.approx(exp_l2, abs=1e-5)
            assert row["tiled_l2"] == pytest.approx(exp_tiled, abs=1e-5)
            assert row["extracted"] is (exp_tiled < 0.15) and row["verify_error"] is None
        elif row["rank"] == 2:  # not selected: nothing set
            assert row["tiled_l2"] is None and row["extracted"] is None and row["verify_error"] is None
        elif row["query_id"] == "truncated.png":
            assert row["tiled_l2"] is None and row["verify_error"] == "query_truncated"
        elif row["train_key"] == "000000077":
            assert row["tiled_l2"] is None and row["verify_error"] == "train_key_not_found"
        elif row["train_key"] == "000000009":
            assert row["tiled_l2"] is None and row["verify_error"] == "train_no_image"
        else:  # a different real image at rank 1
            assert row["tiled_l2"] > 0.15 and row["extracted"] is False
    assert stats["verify_pairs"] == 9 and stats["verified"] == 6
    assert stats["extracted"] == 2 and stats["extracted_queries"] == 2  # one_tile and checker_30
    assert stats["verify_errors"] == {"query_truncated": 1, "train_key_not_found": 1, "train_no_image": 1}
    assert len(stats["verify_error_examples"]) == 3


def test_verify_without_source_shards_reports_no_source():
    rows = [
        {
            "query_id": "q.png",
            "query_source": "/nowhere/q.png",
            "rank": 0,
            "train_key": "0",
            "embedding_shard": 0,
        }
    ]
    manifest = {"embedding_shards": [{"source": "img_emb/img_emb_0.npy"}]}  # imported CLIP embeddings
    table, stats = verify_matches(_matches(rows), manifest, "idx", VerifySpec())
    assert table["verify_error"].to_pylist() == ["train_no_source"] and stats["verified"] == 0


def test_density_relative_score_from_the_query_top_matches(real_images, tmp_path):
    """density_l2 = pixel_l2 / (alpha · mean pixel_l2 to the query's top `neighbours` matches), from
    neighbours fetched in groups of whole queries; a neighbour that cannot be fetched leaves the mean."""
    bases = [_base(p) for p in real_images[:4]]
    shard = str(tmp_path / "00000.tar")
    _tar(shard, [(f"{i:09d}.png", _png(b)) for i, b in enumerate(bases)])
    queries = {
        "one_tile.png": _planted(bases[0])["one_tile"][0],
        "offset_45.png": _planted(bases[1])["offset_45"][0],
    }
    rows = []
    for name, img in queries.items():
        (tmp_path / name).write_bytes(_png(img))
        keys = (
            ["000000000", "000000001", "000000002"]
            if name == "one_tile.png"
            else ["000000001", "000000003", "000000077"]
        )
        rows += [
            {
                "query_id": name,
                "query_source": str(tmp_path / name),
                "rank": rank,
                "train_key": key,
                "embedding_shard": 0,
            }
            for rank, key in enumerate(keys)
        ]
    spec = VerifySpec(ranks=1, neighbours=3, alpha=0.5, fetch_pairs=4)
    table, stats = verify_matches(_matches(rows), {"embedding_shards": [{"source": shard}]}, "idx", spec)
    got = {(r["query_id"], r["rank"]): r for r in table.to_pylist()}

    def l2(query, key):
        return float(pixel.pixel_distances(queries[query][None], bases[int(key)][None])[0][0])

    for name, keys in (
        ("one_tile.png", ["0", "1", "2"]),
        ("offset_45.png", ["1", "3"]),
    ):  # 77: not in the shard
        expected = l2(name, keys[0]) / (0.5 * np.mean([l2(name, k) for k in keys]))
        assert got[(name, 0)]["density_l2"] == pytest.approx(expected, rel=1e-4)
        assert got[(name, 0)]["pixel_l2"] == pytest.approx(l2(name, keys[0]), abs=1e-6)
    # neighbours are compared but only the selected ranks get columns, and only they report errors
    assert all(
        r["pixel_l2"] is None and r["density_l2"] is None and r["verify_error"] is None
        for (_, rank), r in got.items()
        if rank
    )
    # a near-copy is far closer than the other images; a copy moved by 45 grey levels is not
    assert got[("one_tile.png", 0)]["density_l2"] < 1 < got[("offset_45.png", 0)]["density_l2"]
    assert stats["density_scored"] == 2 and stats["neighbour_pairs"] == 6 and stats["neighbour_failed"] == 1
    assert stats["verified"] == 2 and stats["verify_errors"] == {}
    # without neighbours the column stays null and the counts are absent
    plain, plain_stats = verify_matches(
        _matches(rows), {"embedding_shards": [{"source": shard}]}, "idx", VerifySpec()
    )
    assert plain["density_l2"].null_count == plain.num_rows and "density_scored" not in plain_stats


def test_fetch_groups_hold_whole_queries():
    from copyscan.search.verify.matches import query_groups

    query_of = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}
    assert query_groups(list(query_of), query_of, 4) == [[0, 1, 2], [3, 4, 5]]
    assert query_groups(list(query_of), query_of, 2) == [[0, 1, 2], [3, 4], [5]]
    assert query_groups(list(query_of), query_of, 100) == [[0, 1, 2, 3, 4, 5]]
