"""Range search with the score normalisation folded into the query (scan option radius), against brute force."""

import faiss
import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from copyscan.indexing.build.ivf import BackgroundSample
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import validate
from copyscan.indexing.store import layout
from copyscan.indexing.store.manifest import resolve
from copyscan.search.ann.normalise import ScoreNormaliser, whiten
from copyscan.search.ann.radius import MIN_TAU, Above, capped, keep_above, radius_counts, range_search_index
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.ann.topk import ShardResult, merge_sorted_with
from copyscan.search.scan_config import ScanConfig

PER_SHARD = 500


def _duplicated(rng, n, d, n_groups, group_size):
    """Clustered unit vectors where ``n_groups`` vectors have ``group_size`` near-copies each (LAION's
    duplicates): the queries near them have many matches above any radius, the others few."""
    xb = clustered(n, d, 150, rng)
    for g in range(n_groups):
        rows = np.arange(g * group_size, (g + 1) * group_size)
        xb[rows] = xb[rows[0]] + 0.04 * rng.standard_normal((group_size, d)).astype(np.float32)
    return xb / np.linalg.norm(xb, axis=1, keepdims=True)


def _index(tmp_path, whitening="pca", flat=False, seed=0, factory="auto"):
    rng = np.random.default_rng(seed)
    d, n = 32, 4_000
    xb = _duplicated(rng, n, d, 10, 40)
    picks = np.r_[np.arange(0, 400, 40), rng.choice(np.arange(400, n), 30, replace=False)]
    xq = xb[picks] + 0.08 * rng.standard_normal((len(picks), d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, PER_SHARD)
    plan, manifest = build(
        out,
        stats,
        d,
        whitening=whitening,
        factory=factory,
        flat_threshold=10**6 if flat else 0,
        max_shard_vectors=1_000,
        max_code_bytes=8,
    )
    searcher = ShardSearcher(out, manifest, [e["index_shard"] for e in manifest["index_shards"]])
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in sorted(stats)]).astype(np.float32)
    return out, plan, manifest, searcher, xq, stored


def _packed(rows):
    rows = np.asarray(rows, dtype=np.int64)
    return np.concatenate(
        [
            layout.pack_ids(int(s), rows[rows // PER_SHARD == s] % PER_SHARD)
            for s in np.unique(rows // PER_SHARD)
        ]
    )


def _exact_scores(searcher, xq, stored):
    """(nq, n) exact scores in the index's space, as re-ranking computes them."""
    return whiten(searcher.whitening, xq) @ whiten(searcher.whitening, stored).T


@pytest.mark.parametrize("whitening, factory", [("pca", "auto"), ("none", "OPQ4,IVF64,PQ4x4np")])
def test_folded_range_search_is_one_range_search_per_query(tmp_path, whitening, factory):
    _, plan, _, searcher, xq, _ = _index(tmp_path, whitening, factory=factory)
    assert searcher.coarse is not None
    xw = whiten(searcher.whitening, xq)
    rng = np.random.default_rng(3)
    tau = rng.uniform(0.3, 0.8, len(xq)).astype(np.float32)
    folded = searcher.coarse.range_search(searcher.coarse.assign(xw, plan.nprobe), tau)
    for (lims, D, I), index in zip(folded, searcher.indexes.values(), strict=True):
        faiss.extract_index_ivf(index).nprobe = plan.nprobe
        for i in range(len(xq)):  # faiss' own range search, one query and its own radius at a time
            _, D1, I1 = index.range_search(xw[i : i + 1], float(tau[i]))
            got = dict(zip(I[lims[i] : lims[i + 1]].tolist(), D[lims[i] : lims[i + 1]].tolist(), strict=True))
            assert set(got) == set(I1.tolist())
            np.testing.assert_allclose([got[j] for j in I1.tolist()], D1, rtol=1e-5, atol=1e-6)


def test_folded_range_search_on_a_flat_index_is_exact():
    rng = np.random.default_rng(4)
    xb = clustered(3_000, 16, 40, rng)
    index = faiss.IndexIDMap(faiss.IndexFlatIP(16))
    index.add_with_ids(xb, np.arange(3_000) * 7)
    xq = xb[:25]
    tau = rng.uniform(0.5, 0.95, 25).astype(np.float32)
    lims, D, I = range_search_index(index, xq, tau)
    sims = xq @ xb.T
    for i in range(25):
        want = np.flatnonzero(sims[i] >= tau[i]) * 7
        assert sorted(I[lims[i] : lims[i + 1]].tolist()) == sorted(want.tolist())
    np.testing.assert_allclose(
        D, sims[np.repeat(np.arange(25), np.diff(lims).astype(int)), I // 7], atol=1e-5
    )
    pca = faiss.PCAMatrix(16, 8)
    pca.train(xb)
    with pytest.raises(ValueError, match="PCAMatrix"):  # a transform with a bias does not scale
        range_search_index(faiss.IndexPreTransform(pca, faiss.IndexFlatIP(8)), xq, tau)


def test_floor_bounds_every_training_images_bias(tmp_path):
    out, _, manifest, searcher, xq, stored = _index(tmp_path, flat=True)
    spec = manifest["background"]
    sample = BackgroundSample(resolve(out, spec["path"]), spec["ranks"])
    xw = whiten(searcher.whitening, xq)
    ids = _packed(np.arange(len(stored)))
    bias = sample.bias(xw, np.broadcast_to(ids, (len(xq), len(ids))).copy())  # every image as the hit
    floor = sample.floor(xw)
    assert np.isfinite(floor).all()
    np.testing.assert_allclose(floor, bias.min(1), atol=1e-6)  # the bound is attained: the tightest one
    norm = ScoreNormaliser(out, manifest, beta=0.5)
    np.testing.assert_allclose(norm.floor(xq), 0.5 * floor, atol=1e-6)


@pytest.mark.parametrize("flat", [True, False])
def test_search_above_returns_every_vector_above_the_floor(tmp_path, flat):
    _, plan, _, searcher, xq, stored = _index(tmp_path, flat=flat)
    sims = _exact_scores(searcher, xq, stored)
    k, extra = 5, 60
    lo = np.quantile(sims, 0.995, axis=1).astype(np.float32)  # ~20 vectors above, more for duplicates
    lo[3] = np.nan  # no floor: top k only
    result = searcher.search(xq, k, 100, plan.nprobe, Above(lo, extra, 0.1))
    assert result.I.shape[1] <= k + extra and result.truncated is not None
    plain = searcher.search(xq, k, 100, plan.nprobe)
    np.testing.assert_array_equal(result.I[:, :k], plain.I)  # the top k as without it
    np.testing.assert_array_equal(result.D[:, :k], plain.D)
    shard, row = layout.unpack_ids(np.maximum(result.I, 0))
    found = np.where(result.I >= 0, shard * PER_SHARD + row, -1)
    recalls = []
    for q in range(len(xq)):
        got = found[q, k:][found[q, k:] >= 0]
        assert len(set(got)) == len(got) and not set(got) & set(found[q, :k])
        if q == 3:
            assert len(got) == 0
            continue
        assert (sims[q, got] >= lo[q] - 1e-5).all()  # nothing below the floor
        assert (np.diff(result.D[q, k : k + len(got)]) <= 1e-6).all()  # best first
        np.testing.assert_allclose(result.D[q, k : k + len(got)], sims[q, got], atol=1e-4)
        np.testing.assert_allclose(result.D_raw[q, k : k + len(got)], xq[q] @ stored[got].T, atol=1e-4)
        want = set(np.flatnonzero(sims[q] >= lo[q])) - set(found[q, :k])
        assert len(want) <= extra
        assert not result.truncated[q]
        if want:
            recalls.append(len(set(got) & want) / len(want))
    assert len(recalls) >= 30
    if flat:
        assert min(recalls) == 1.0
    else:
        assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_search_above_cuts_at_extra_and_says_so(tmp_path):
    _, plan, _, searcher, xq, stored = _index(tmp_path, flat=True)
    sims = _exact_scores(searcher, xq, stored)
    lo = np.full(len(xq), 0.0, dtype=np.float32)  # half the index is above: far more than 7
    result = searcher.search(xq, 3, 50, plan.nprobe, Above(lo, 7, 0.0))
    assert result.I.shape[1] == 10 and (result.I >= 0).all() and result.truncated.all()
    shard, row = layout.unpack_ids(result.I)
    found = shard * PER_SHARD + row
    for q in range(len(xq)):  # the best 10 overall: top 3, then the 7 best of the rest
        np.testing.assert_array_equal(np.sort(found[q]), np.sort(np.argsort(-sims[q])[:10]))


def test_keep_above_drops_only_extras_below_the_radius():
    D = np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.2, 0.6, 0.5, -np.inf]], dtype=np.float32)
    I = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, -1]])
    D_norm = np.array([[0.5, 0.1, 0.3, np.nan, 0.25], [0.1, 0.0, 0.2, 0.4, np.nan]], dtype=np.float32)
    result = ShardResult(D, I, D + 1, {}, D_norm=D_norm, truncated=np.array([False, True]))
    kept = keep_above(result, 2, 0.25)  # the first 2 stay whatever their score
    np.testing.assert_array_equal(kept.I, [[1, 2, 3, 5], [6, 7, 9, -1]])
    np.testing.assert_allclose(kept.D, [[0.9, 0.8, 0.7, 0.5], [0.9, 0.2, 0.5, -np.inf]])
    np.testing.assert_allclose(kept.D_raw, [[1.9, 1.8, 1.7, 1.5], [1.9, 1.2, 1.5, np.nan]])
    np.testing.assert_allclose(kept.D_norm, [[0.5, 0.1, 0.3, 0.25], [0.1, 0.0, 0.4, np.nan]])
    np.testing.assert_array_equal(kept.truncated, [False, True])
    counts = radius_counts(kept, 2, Above(np.array([0.3, np.nan], np.float32), 5, 0.29))
    assert counts == {
        "extra_matches": 3,
        "queries_with_extra": 2,
        "truncated": 1,
        "deep": 1,
        "no_floor": 1,
    }
    assert MIN_TAU > 0.3 - 0.29


def test_capped_keeps_each_querys_best():
    lims = np.array([0, 3, 3, 7])
    D = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.4, 0.6], dtype=np.float32)
    I = np.arange(7)
    owner, ids, scores, more = capped(lims, D, I, 2)
    assert owner.tolist() == [0, 0, 2, 2] and ids.tolist() == [1, 2, 4, 6]
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.8, 0.6])
    assert more.tolist() == [True, False, True]


def test_merge_sorted_with_carries_values():
    a = (np.array([[0.9, 0.3]], np.float32), np.array([[1, 2]]), np.array([[10, 20]], np.float32))
    b = (
        np.array([[0.5, 0.4, 0.1]], np.float32),
        np.array([[3, -1, 5]]),
        np.array([[30, 40, 50]], np.float32),
    )
    D, I, V = merge_sorted_with([a, b], 4)
    assert I.tolist() == [[1, 3, 2, 5]] and V.tolist() == [[10, 30, 20, 50]]
    D, I, V = merge_sorted_with([a, b], 10)  # as wide as both: the missing one last
    assert D.shape == (1, 5) and I[0, -1] == -1 and np.isnan(V[0, -1]) and D[0, -1] == -np.inf


def test_radius_equals_a_deep_top_k_filtered_by_score_norm(tmp_path):
    """What the scan driver does with radius (floor, search above, normalise, keep_above) gives the same
    matches as asking for every vector and keeping those with score_norm >= radius: exact on a flat index."""
    out, plan, manifest, searcher, xq, stored = _index(tmp_path, flat=True)
    norm = ScoreNormaliser(out, manifest, beta=1.0)
    k, radius = 3, 0.1
    above = Above(radius + norm.floor(xq), 500, 0.1)
    got = searcher.search(xq, k, 100, plan.nprobe, above)
    got.D_norm = norm(xq, got.D, got.I)
    got = keep_above(got, k, radius)
    everything = searcher.search(xq, len(stored), len(stored))
    everything.D_norm = norm(xq, everything.D, everything.I)
    matched = 0
    for q in range(len(xq)):
        want = everything.I[q, :k].tolist() + [
            i for i, s in zip(everything.I[q, k:], everything.D_norm[q, k:], strict=True) if s >= radius
        ]
        assert got.I[q][got.I[q] >= 0].tolist() == want
        matched += len(want) > k
    assert matched >= 10  # the duplicated vectors' queries have extras


def test_radius_config_is_checked():
    base = {"index": "i", "queries": "q", "out": "o"}
    validate(ScanConfig(**base, radius="p90"))
    validate(ScanConfig(**base, radius=0.2))
    for bad, message in (
        ({"radius": "somepalli"}, "score_norm threshold"),
        ({"radius": "high"}, "p90, p99 or a score_norm value"),
        ({"radius": "p90", "radius_max": 0}, "radius_max must be positive"),
        ({"radius": "p90", "beta": -1.0}, "beta >= 0"),
    ):
        with pytest.raises(CopyscanError, match=message):
            validate(ScanConfig(**base, **bad))
