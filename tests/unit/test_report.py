"""Report statistics and the index-side measurements (train→train, duplicates) against brute force."""

import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from indexing.store import layout
from search.report import html, stats
from search.report.config import ReportConfig
from search.report.neighbours import near_duplicates, sample_ids, train_train


def test_histogram_counts_everything_and_integrates_to_the_share_inside():
    values = np.array([-0.2, 0.0, 0.0049, 0.005, 0.5, 0.999, 1.0, 1.3, np.nan])
    h = stats.histogram(values)
    assert len(h["counts"]) == 200 and np.allclose(np.diff(h["edges"]), 0.005)
    assert h["below"] == 1 and h["above"] == 1
    assert h["counts"].sum() == 6  # 1.0 falls in the last (closed) bin; NaN is not a value
    assert h["counts"][0] == 2 and h["counts"][1] == 1 and h["counts"][100] == 1 and h["counts"][199] == 2
    assert np.isclose((h["density"] * 0.005).sum(), 6 / 8)


def test_describe_and_its_bootstrap_interval_cover_the_truth():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(100):
        values = rng.uniform(0, 1, 400)  # true P(value >= 0.9) = 0.1
        d = stats.describe(values, [0.9], resamples=500, seed=trial)
        lo, hi = d["above"]["0.9"]["ci95"]
        covered += lo <= 0.1 <= hi
    assert 88 <= covered <= 100  # a 95 % interval: ~95 of 100 (binomial spread)
    d = stats.describe(np.array([0.1, 0.2, 0.3, 0.4, np.nan]), [0.25], resamples=100)
    assert d["n"] == 4 and d["missing"] == 1 and np.isclose(d["mean"], 0.25)
    assert np.isclose(d["p75"], np.percentile([0.1, 0.2, 0.3, 0.4], 75))
    assert d["above"]["0.25"]["count"] == 2 and d["above"]["0.25"]["fraction"] == 0.5
    assert stats.describe(np.array([np.nan]), [0.5])["mean"] is None


def test_shift_interval_contains_the_difference_and_excludes_zero_when_shifted():
    rng = np.random.default_rng(2)
    s = stats.shift(rng.normal(0.4, 0.1, 500), rng.normal(0.3, 0.1, 500), resamples=400)
    assert s["method"] == "bootstrap" and s["ci95"][0] < s["mean_difference"] < s["ci95"][1]
    assert s["ci95"][0] > 0.05 and s["ci95"][1] < 0.15
    big = stats.shift(rng.normal(0.3, 0.1, 300_000), rng.normal(0.3, 0.1, 1000))
    assert big["method"] == "normal" and big["ci95"][0] < 0 < big["ci95"][1]


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory):
    """An IVF-PQ index whose collection holds planted groups of near-identical vectors."""
    rng = np.random.default_rng(0)
    d = 64
    xb = clustered(3_000, d, 150, rng)
    group_sizes = [2, 3, 4, 6, 9]
    start = 0
    for size in group_sizes:  # vectors start..start+size-1 become near-copies of vector `start`
        base = xb[start]
        for i in range(start + 1, start + size):
            v = base + 0.01 * rng.standard_normal(d).astype(np.float32)
            xb[i] = v / np.linalg.norm(v)
        start += size
    rng.shuffle(xb)  # spread the groups over shards
    out = str(tmp_path_factory.mktemp("dup") / "idx")
    stats_ = write_collection(out, xb, 700)
    plan, manifest = build(out, stats_, d, flat_threshold=0, max_shard_vectors=1_500, max_code_bytes=32)
    assert plan.factory.startswith("IVF") and len(manifest["index_shards"]) >= 2
    ids = np.concatenate(
        [layout.pack_ids(e["shard"], np.arange(e["count"])) for e in manifest["embedding_shards"]]
    )
    return out, manifest, xb, ids


def test_near_duplicates_match_brute_force(dup_index, tmp_path):
    out, manifest, xb, ids = dup_index
    cfg = ReportConfig(run="unused", cache_dir=str(tmp_path / "cache"), nprobe=16)
    sims = xb @ xb.T
    np.fill_diagonal(sims, -1)
    truth = (sims >= cfg.duplicate_radius).sum(axis=1)
    assert sorted(np.unique(truth))[-1] == 8  # the 9-group
    chosen = np.concatenate([np.nonzero(truth > 0)[0], np.arange(0, 3_000, 97)])
    got = near_duplicates(cfg, out, manifest, ids[chosen])
    np.testing.assert_array_equal(got, truth[chosen])


def test_train_train_is_the_best_other_image(dup_index, tmp_path):
    out, manifest, xb, ids = dup_index
    cfg = ReportConfig(run="unused", cache_dir=str(tmp_path / "cache"), nprobe=32, candidates=200)
    chosen = sample_ids(manifest, 300, seed=5)
    assert len(np.unique(chosen)) == 300 and np.isin(chosen, ids).all()
    assert not np.array_equal(chosen, sample_ids(manifest, 300, seed=6))
    rows = np.searchsorted(ids, chosen)
    got = train_train(cfg, out, manifest, chosen)
    sims = xb[rows] @ xb.T
    sims[np.arange(len(rows)), rows] = -np.inf
    best = sims.max(axis=1)
    assert (got["neighbour"] != chosen).all()
    # IVF-PQ + exact re-ranking: the best other image, found for nearly all, scored exactly
    exact = np.einsum("nd,nd->n", xb[rows], xb[np.searchsorted(ids, got["neighbour"])])
    np.testing.assert_allclose(got["score"], exact, atol=2e-3)  # fp16 stored vectors
    assert np.mean(np.isclose(got["score"], best, atol=1e-3)) >= 0.95
    assert np.isfinite(got["score_norm"]).all() and (got["score_norm"] <= got["score"] + 1e-6).all()


def test_script_data_cannot_close_the_script_element():
    text = html._json_for_script([{"caption": "</script><script>alert(1)</script>", "x": float("nan")}])
    assert "</script" not in text and '"x":null' in text
