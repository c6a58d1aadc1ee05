import numpy as np

from copyscan.indexing.store import layout
from copyscan.search.ann.topk import merge_topk


def test_merge_matches_a_global_sort():
    rng = np.random.default_rng(0)
    nq, k = 7, 5
    parts, all_d, all_i = [], [], []
    for p in range(4):
        D = np.sort(rng.random((nq, k)).astype(np.float32), axis=1)[:, ::-1]
        I = rng.integers(0, 1000, (nq, k)) + 1000 * p
        I[0, -1] = -1
        parts.append((D.copy(), I))
        all_d.append(np.where(I < 0, -np.inf, D))
        all_i.append(I)
    D, I = merge_topk(parts, k)
    flat_d, flat_i = np.concatenate(all_d, 1), np.concatenate(all_i, 1)
    order = np.argsort(-flat_d, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(D, np.take_along_axis(flat_d, order, 1))
    np.testing.assert_array_equal(I, np.take_along_axis(flat_i, order, 1))
    assert (I >= 0).all()


def test_merge_reports_missing_results():
    D, I = merge_topk([(np.array([[0.5]], np.float32), np.array([[3]]))], 3)
    assert I.tolist() == [[3, -1, -1]] and np.isneginf(D[0, 1:]).all()


def test_ids_round_trip():
    rows = np.array([0, 1, 2**32 - 1])
    ids = layout.pack_ids(12345, rows)
    shard, row = layout.unpack_ids(np.concatenate([ids, [-1]]))
    assert shard.tolist() == [12345, 12345, 12345, -1] and row.tolist() == [0, 1, 2**32 - 1, -1]


def test_artifact_names():
    assert layout.emb_url("s3://b/idx", 42) == "s3://b/idx/embeddings/img_emb/img_emb_00042.npy"
    assert layout.index_shard_url("/x", "IVF256,PQ32np", 3) == "/x/index/IVF256_PQ32np/shard-00003.index"
    assert layout.shard_of_stats_name("a/stats_00017.json") == 17
