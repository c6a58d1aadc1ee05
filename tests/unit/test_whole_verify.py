"""Whole-copy verification (search/verify/whole.py): the peak against a brute-force correlation, the score
against each generation's other candidates, and the real network re-ranking a transformed copy's candidates
re-fetched from a shard."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from copyscan.indexing.embed.augment import copy_augment
from copyscan.indexing.read.images import open_rgb
from copyscan.search.scan_config import ScanConfig
from copyscan.search.verify.whole import (
    BACKGROUND,
    WholeSpec,
    peak,
    verify_whole,
    whole_matcher,
    whole_scores,
)


def _unit_cells(x: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(x).float(), dim=0)


def test_peak_is_the_best_mean_cell_cosine_over_offsets():
    rng = np.random.default_rng(0)
    train = _unit_cells(rng.normal(size=(8, 10, 12)))
    # 6 x 7 cells at row 2, column 3: 0.6 of the height, 0.58 of the width
    query = train[:, 2:8, 3:10].clone()
    # at f = 0.6 the query keeps its size (its tighter axis is the height), and sits exactly at (2, 3)
    assert peak(query, train, (0.6,)) == pytest.approx(1.0, abs=1e-5)
    # brute force at f = 0.5: the query resampled to 5 x 6 cells (scale 0.5 / 0.6), slid over every offset
    small = F.normalize(
        F.interpolate(query[None], size=(5, 6), mode="bilinear", align_corners=False)[0], dim=0
    )
    assert peak(query, train, (0.5,)) == pytest.approx(
        max(
            float((train[:, y : y + 5, x : x + 6] * small).sum(0).mean())
            for y in range(10 - 5 + 1)
            for x in range(12 - 6 + 1)
        ),
        rel=1e-5,
    )
    assert peak(query, train, (0.5, 0.6)) == pytest.approx(1.0, abs=1e-5)  # the best fraction wins
    other = _unit_cells(rng.normal(size=(8, 10, 12)))
    assert peak(query, other, (0.5, 0.6)) < 0.5
    assert peak(query, train[:, :5, :5], (0.9,)) is not None  # resampled to fit
    assert peak(_unit_cells(rng.normal(size=(8, 1, 30))), train, (0.95,)) is not None
    assert peak(query, train, ()) is None


def test_whole_scores_read_each_peak_against_the_generations_other_candidates():
    queries = ["a"] * 5 + ["b"] * 2 + ["c"]
    peaks = np.array([0.9, 0.5, 0.6, 0.4, np.nan, 0.7, 0.7, 0.8], dtype=np.float32)
    score_norm = np.array([0.1, 0.3, 0.0, 0.0, 0.5, 0.2, 0.1, 0.4], dtype=np.float32)
    score, rank = whole_scores(queries, score_norm, peaks, weight=2.0)
    assert BACKGROUND == 3
    expected_a = [
        0.1 + 2 * (0.9 - np.mean([0.6, 0.5, 0.4])),
        0.3 + 2 * (0.5 - np.mean([0.9, 0.6, 0.4])),
        0.0 + 2 * (0.6 - np.mean([0.9, 0.5, 0.4])),
        0.0 + 2 * (0.4 - np.mean([0.9, 0.6, 0.5])),
    ]
    assert score[:4] == pytest.approx(expected_a, abs=1e-6)
    assert score[5:7] == pytest.approx([0.2, 0.1], abs=1e-6)  # equal peaks: the margin is 0
    assert np.isnan(score[4]) and np.isnan(score[7])  # not verified; alone in its generation
    assert rank.tolist() == [0, 1, 2, 3, -1, 0, 1, -1]


def test_spec_and_config_problems():
    assert WholeSpec().problems() == []
    assert len(WholeSpec(ranks=1, weight=0, query_side=32, fractions=(0.5, 1.2)).problems()) == 4
    assert ScanConfig(index="i", queries="q", out="o", verify_whole=10).problems() == []
    for bad in ({"verify_whole": 1}, {"verify_whole": 11}, {"verify_whole": 3, "verify_whole_weight": 0}):
        problems = ScanConfig(index="i", queries="q", out="o", **bad).problems()
        assert any("verify_whole must be 0 (off) or between 2 and k (10)" in p for p in problems), bad


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


def test_verify_whole_puts_the_source_of_a_transformed_copy_first(real_images, tmp_path):
    """A copy (crop, rotation, colour, rescale, text, JPEG) of one real image, its source ranked third by
    the global search among four other real images: verification makes the source the answer, with the
    highest peak; a candidate that cannot be fetched gets a reason, rows past the ranks stay null."""
    images = [open_rgb(p) for p in real_images[20:26]]
    source = images[0]
    copy = copy_augment(source, np.random.default_rng(5))
    train = {"s": source, **{f"o{i}": img for i, img in enumerate(images[1:])}}
    shard = tmp_path / "00000.tar"
    shard.write_bytes(_tar({f"{k}.jpg": _jpeg(img) for k, img in train.items()} | {"bad.jpg": b"no image"}))
    query = tmp_path / "gen.jpg"
    copy.save(query, quality=90)
    keys = ["o0", "o1", "s", "o2", "bad", "gone", "o3"]
    n = len(keys)
    table = pa.table(
        {
            "query_id": ["gen.jpg"] * n,
            "rank": pa.array(range(n), pa.int32()),
            "train_key": keys,
            "score_norm": pa.array([0.30, 0.25, 0.20, 0.15, 0.1, 0.1, 0.05], pa.float32()),
            "embedding_shard": pa.array([0] * n, pa.int32()),
            "query_source": [str(query)] * n,
        }
    )
    manifest = {"embedding_shards": [{"source": str(shard)}]}
    spec = WholeSpec(ranks=6)
    out, stats = verify_whole(table, manifest, "index", spec, matcher=whole_matcher(spec))
    rows = out.to_pylist()
    assert stats["whole_pairs"] == 6 and stats["whole_verified"] == 4 and stats["whole_no_fit"] == 0
    assert stats["whole_errors"] == {"train_key_not_found": 1, "train_not_an_image": 1}
    assert [r["verify_whole_error"] for r in rows] == [None, None, None, None, "train_not_an_image"] + [
        "train_key_not_found",
        None,
    ]
    by_key = {r["train_key"]: r for r in rows}
    assert by_key["s"]["verify_rank"] == 0
    assert by_key["s"]["verify_peak"] > max(by_key[k]["verify_peak"] for k in ("o0", "o1", "o2")) + 0.05
    assert sorted(r["verify_rank"] for r in rows[:4]) == [0, 1, 2, 3]
    others = sorted((by_key[k]["verify_peak"] for k in ("o0", "o1", "o2")), reverse=True)
    assert by_key["s"]["verify_score"] == pytest.approx(
        0.20 + spec.weight * (by_key["s"]["verify_peak"] - np.mean(others)), abs=1e-5
    )
    for r in rows[4:]:  # not verifiable, or past the ranks
        assert r["verify_peak"] is None and r["verify_score"] is None and r["verify_rank"] is None
