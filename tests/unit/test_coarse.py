"""One coarse quantisation per searcher gives exactly the results of searching every index shard alone."""

import faiss
import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from indexing.store import layout
from search.ann.coarse import SharedCoarse
from search.ann.normalise import whiten
from search.ann.searcher import ShardSearcher


def _collection(tmp_path, whitening, seed=0, name="idx", factory="auto"):
    rng = np.random.default_rng(seed)
    d, n = 32, 4_000
    xb = clustered(n, d, 150, rng)
    xq = xb[rng.choice(n, 120, replace=False)] + 0.1 * rng.standard_normal((120, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    out = str(tmp_path / name)
    stats = write_collection(out, xb, 500)
    plan, manifest = build(
        out,
        stats,
        d,
        whitening=whitening,
        factory=factory,
        flat_threshold=0,
        max_shard_vectors=1_000,
        max_code_bytes=8,
    )
    return out, plan, manifest, xq


@pytest.mark.parametrize(
    "whitening, factory",
    [("pca", "auto"), ("none", "OPQ4,IVF64,PQ4x4np")],  # OPQ: a transform chain
)
def test_shared_quantisation_returns_what_each_shard_returns(tmp_path, whitening, factory):
    out, plan, manifest, xq = _collection(tmp_path, whitening, factory=factory)
    shards = [e["index_shard"] for e in manifest["index_shards"]]
    assert len(shards) >= 4
    searcher = ShardSearcher(out, manifest, shards)
    assert searcher.coarse is not None
    # one copy of the centroids: every shard points at the first shard's quantizer
    pointers = {int(faiss.extract_index_ivf(ix).quantizer.this) for ix in searcher.indexes.values()}
    assert len(pointers) == 1

    xw = whiten(searcher.whitening, xq)
    for nprobe in (1, plan.nprobe, 10_000):  # 10,000 > nlist: clamped like ShardSearcher.set_nprobe
        alone = []
        for j in shards:  # each shard read on its own, searched with its own quantizer
            index = faiss.read_index(layout.index_shard_url(out, plan.factory, j))
            faiss.extract_index_ivf(index).nprobe = min(nprobe, faiss.extract_index_ivf(index).nlist)
            alone.append(index.search(xw, 50)[1])
        shared = searcher.coarse.search(xw, [50] * len(shards), nprobe)
        for a, b in zip(alone, shared, strict=True):
            np.testing.assert_array_equal(a, b)

    # the whole search (per-shard candidates, re-ranking, merge) is unchanged
    reference = ShardSearcher(out, manifest, shards)
    reference.coarse = None  # the per-shard path: index.search on every shard
    for candidates in (20, 100):
        got = searcher.search(xq, 10, candidates, plan.nprobe)
        want = reference.search(xq, 10, candidates, plan.nprobe)
        np.testing.assert_array_equal(got.I, want.I)
        np.testing.assert_array_equal(got.D, want.D)
        np.testing.assert_array_equal(got.D_raw, want.D_raw)


def test_shards_of_different_trainings_are_searched_alone(tmp_path):
    out_a, plan, manifest_a, _ = _collection(tmp_path, "pca", seed=0, name="a")
    out_b, _, manifest_b, _ = _collection(tmp_path, "pca", seed=1, name="b")
    ia = faiss.read_index(layout.index_shard_url(out_a, plan.factory, 0))
    ib = faiss.read_index(layout.index_shard_url(out_b, plan.factory, 0))
    assert SharedCoarse.of([ia, ib]) is None
    assert SharedCoarse.of([faiss.IndexIDMap(faiss.IndexFlatIP(32))]) is None
    assert SharedCoarse.of([ia]) is not None
