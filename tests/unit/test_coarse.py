"""One coarse quantisation per searcher gives exactly the results of searching every index shard alone."""

import faiss
import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from copyscan.indexing.store import layout
from copyscan.search.ann.coarse import SharedCoarse
from copyscan.search.ann.normalise import whiten
from copyscan.search.ann.searcher import ShardSearcher


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


@pytest.mark.parametrize("device", ["torch", "cuda", "faiss-gpu"])
def test_coarse_assignment_off_the_cpu_finds_the_same_lists(tmp_path, device):
    """search_device=torch (here on the CPU; on CUDA where a GPU is) and faiss-gpu assign each query block
    to the lists faiss's CPU quantizer picks, so the scan's results are those of the CPU search."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the torch assignment is tested on the CPU")
    if device == "faiss-gpu" and faiss.get_num_gpus() == 0:
        pytest.skip("the installed faiss has no GPU (faiss-cpu: the .[cpu] extra)")
    out, plan, manifest, xq = _collection(tmp_path, "pca")
    shards = [e["index_shard"] for e in manifest["index_shards"]]
    cpu = ShardSearcher(out, manifest, shards)
    off = ShardSearcher(out, manifest, shards, device="faiss-gpu" if device == "faiss-gpu" else "torch")
    assert cpu.device == "cpu"
    assert off.device == {"torch": "torch:cpu", "cuda": "torch:cuda", "faiss-gpu": "faiss-gpu"}[device]
    xw = whiten(cpu.whitening, xq)
    for nprobe in (1, plan.nprobe):
        _, Iq, Dq = cpu.coarse.assign(xw, nprobe)
        _, Iq2, Dq2 = off.coarse.assign(xw, nprobe)
        assert Iq2.dtype == np.int64 and Dq2.dtype == np.float32 and Iq2.shape == Iq.shape
        assert (Iq == Iq2).mean() >= 0.99  # ties and float32 rounding may swap neighbours
        np.testing.assert_allclose(np.sort(Dq2, 1), np.sort(Dq, 1), atol=1e-4)
    got = off.search(xq, 10, 50, plan.nprobe)
    want = cpu.search(xq, 10, 50, plan.nprobe)
    assert (got.I == want.I).mean() >= 0.99
    np.testing.assert_allclose(got.D[got.I == want.I], want.D[got.I == want.I], atol=1e-5)


@pytest.mark.parametrize("inner_product", [True, False])
def test_torch_nearest_answers_like_a_flat_faiss_index(inner_product):
    import torch

    from copyscan.indexing.build.clustering import nearest

    rng = np.random.default_rng(4)
    xb, xq = (
        rng.standard_normal((300, 16)).astype(np.float32),
        rng.standard_normal((70, 16)).astype(np.float32),
    )
    flat = faiss.IndexFlatIP(16) if inner_product else faiss.IndexFlatL2(16)
    flat.add(xb)
    D, I = flat.search(xq, 5)
    Dt, It = nearest(torch.as_tensor(xq), torch.as_tensor(xb), 5, inner_product=inner_product, block=32)
    np.testing.assert_array_equal(It.numpy(), I)
    np.testing.assert_allclose(Dt.numpy(), D, rtol=1e-4, atol=1e-4)
