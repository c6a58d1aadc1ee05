"""Re-ranking with stored whitening norms gives the scores of whitening every candidate again."""

import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from copyscan.indexing.build.postprocess import apply_whitening, whiten_with_norms, whitened_score_terms
from copyscan.indexing.embed.stage import EmbeddedSource, finished_shards, write_shard_outputs
from copyscan.indexing.store import layout, storage
from copyscan.search.ann import exact
from copyscan.search.ann import searcher as ann_searcher
from copyscan.search.ann.normalise import whiten
from copyscan.search.ann.searcher import ShardSearcher


def test_score_terms_unroll_both_whitening_stages():
    rng = np.random.default_rng(0)
    d = 24
    x = clustered(50, d, 5, rng)
    w_q = clustered(7, d, 5, rng)
    for stages in (1, 2):
        params = {"mean": rng.normal(0, 0.1, d).astype(np.float32), "proj": rng.normal(0, 1, (d, 20))}
        if stages == 2:
            params |= {
                "mean2": rng.normal(0, 0.1, 20).astype(np.float32),
                "proj2": rng.normal(0, 1, (20, 16)),
            }
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        xw, norms = whiten_with_norms(params, x)
        np.testing.assert_array_equal(xw, apply_whitening(params, x))
        assert norms.shape == (50, stages)
        q = apply_whitening(params, w_q)
        b, c = whitened_score_terms(params, q)
        fast = x @ b.T - c[:, 0]
        fast /= norms[:, :1]
        if stages == 2:
            fast = (fast - c[:, 1]) / norms[:, 1:]
        np.testing.assert_allclose(fast, xw @ q.T, atol=2e-5)


@pytest.mark.parametrize("whitening", ["pca", "learned"])
def test_searcher_reranks_with_stored_norms_like_whitening_again(tmp_path, whitening):
    rng = np.random.default_rng(1)
    d, n = 32, 2_000
    xb = clustered(n, d, 60, rng)
    out = str(tmp_path / "idx")
    if whitening == "learned":
        for shard, start in enumerate(range(0, n, 500)):
            part = xb[start : start + 500]
            rows = np.repeat(np.arange(100), 2)
            copies = part[rows] + 0.2 * rng.standard_normal((200, d)).astype(np.float32)
            copies /= np.linalg.norm(copies, axis=1, keepdims=True)
            records = [{"key": f"{shard}-{i}"} for i in range(len(part))]
            result = EmbeddedSource(part, records, [], x_pair=copies, pair_rows=rows)
            write_shard_outputs(out, shard, f"/s/{shard}.tar", result, "fp")
        stats = finished_shards(out)
    else:
        stats = write_collection(out, xb, 500)
    plan, manifest = build(out, stats, d, whitening=whitening, flat_threshold=0, max_code_bytes=8)
    assert manifest["index"]["whitened_norms"]
    stages = manifest["whitening"]["stages"]
    assert np.load(layout.norms_url(out, plan.factory, 0)).shape == (500, stages)
    assert storage.exists(layout.norms_url(out, plan.factory, 3))
    xq = xb[:100] + 0.1 * rng.standard_normal((100, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    shards = [e["index_shard"] for e in manifest["index_shards"]]
    fast = ShardSearcher(out, manifest, shards, str(tmp_path / "c1"))
    assert fast.norms is not None
    old = {**manifest, "index": {**manifest["index"], "whitened_norms": False}}  # an index built before
    slow = ShardSearcher(out, old, shards, str(tmp_path / "c2"))
    assert slow.norms is None
    a, b = fast.search(xq, 10, 60, plan.nprobe), slow.search(xq, 10, 60, plan.nprobe)
    np.testing.assert_allclose(a.D, b.D, atol=1e-5)
    assert np.mean(a.I == b.I) > 0.99  # only near-ties may swap
    np.testing.assert_allclose(a.D_raw[a.I == b.I], b.D_raw[a.I == b.I], atol=1e-6)


@pytest.mark.parametrize("shared", [True, False], ids=["dense-product", "per-pair"])
def test_rerank_scores_every_candidate_as_whitening_it_again(tmp_path, shared):
    """Re-ranking gathers a block's distinct candidates once and, when they are few, scores them with one
    matrix product (``copyscan.search.ann.exact``): the scores, raw cosines and density priors are those of
    whitening every candidate again, with densities on, and the query-side terms given once or not."""
    rng = np.random.default_rng(2)
    d, n, nq, c = 32, 2_000, 150, 30
    xb = clustered(n, d, 60, rng)
    out = str(tmp_path / "idx")
    plan, manifest = build(out, write_collection(out, xb, 500), d, whitening="pca", flat_threshold=0)
    searcher = ShardSearcher(out, manifest, [e["index_shard"] for e in manifest["index_shards"]])
    assert searcher.norms is not None
    density = {s: rng.uniform(0.2, 0.6, (len(v), 1)).astype(np.float32) for s, v in searcher.vectors.items()}
    searcher.density, searcher.density_beta, searcher.density_mean = density, 0.7, 0.4
    xq = xb[rng.integers(0, n, nq)] + 0.2 * rng.standard_normal((nq, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    xw = whiten(searcher.whitening, xq)
    ids = np.concatenate([layout.pack_ids(s, np.arange(500)) for s in range(n // 500)])
    if shared:  # the windows of one generation, a small index: few distinct candidates per block
        I0 = np.tile(rng.choice(ids, c, replace=False), (nq, 1))
        assert len(np.unique(I0[: ann_searcher.RERANK_BLOCK])) <= exact.DENSE_PER_CANDIDATE * c
    else:
        I0 = rng.choice(ids, (nq, c))
        assert len(np.unique(I0[: ann_searcher.RERANK_BLOCK])) > exact.DENSE_PER_CANDIDATE * c
    I0[::7, -3:] = -1  # lists shorter than the candidates asked for
    k = 10
    raw = searcher.gather(I0.ravel()).reshape(nq, c, d)
    prior = 0.7 * (searcher._gather_rows(density, I0.ravel(), 1).reshape(nq, c) - 0.4)
    want = np.einsum(
        "qcd,qd->qc", apply_whitening(searcher.whitening, raw.reshape(-1, d)).reshape(nq, c, -1), xw
    )
    want = np.where(I0 >= 0, want - prior, -np.inf)
    order = np.argsort(-want, axis=1, kind="stable")[:, :k]
    for terms in (None, searcher.score_terms(xw)):
        D, I, D_raw, P = searcher.rerank(xq, xw, I0, k, terms)
        np.testing.assert_allclose(D, np.take_along_axis(want, order, 1), atol=2e-5)
        same = I == np.take_along_axis(I0, order, 1)
        assert same.mean() > 0.99  # only near-ties may swap
        cosines = np.einsum("qcd,qd->qc", raw, xq)
        np.testing.assert_allclose(D_raw[same], np.take_along_axis(cosines, order, 1)[same], atol=1e-5)
        np.testing.assert_allclose(P[same], np.take_along_axis(prior, order, 1)[same], atol=1e-6)


def test_pair_dots_dense_product_and_per_pair_agree():
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((40, 16)).astype(np.float32)
    queries = rng.standard_normal((5, 2, 16)).astype(np.float32)
    for c in (6, 3):  # 40 distinct rows: at most 8 x 6 (one product), more than 8 x 3 (per pair)
        inverse = rng.integers(0, 40, (5, c))
        want = np.einsum("qmd,qcd->qmc", queries, vectors[inverse])
        np.testing.assert_allclose(exact.pair_dots(queries, vectors, inverse), want, rtol=1e-5, atol=1e-5)
