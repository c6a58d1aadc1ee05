"""Merging small index shards: the same exact top-k as before, ids kept, and an interrupted merge resumes."""

import numpy as np
import pytest
from test_build_search import build, clustered, write_collection

from copyscan.indexing.build.merge_shards import (
    keep_merged_layout,
    merge_index_shards,
    merged_marker_url,
    plan_merges,
)
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.search.ann.searcher import ShardSearcher


def test_plan_merges_packs_consecutive_shards():
    assert plan_merges({0: 400, 1: 400, 2: 400, 3: 100}, 900) == [[0, 1], [2, 3]]
    assert plan_merges({0: 1000, 1: 1}, 900) == [[0], [1]]


@pytest.mark.parametrize("factory", ["IVF32,PQ4np", "OPQ4,IVF32,PQ4np"])
def test_merged_index_answers_like_the_unmerged_one_and_resumes(tmp_path, factory):
    rng = np.random.default_rng(3)
    d = 16
    xb = clustered(3_000, d, 100, rng)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 500)
    plan, manifest = build(out, stats, d, factory=factory, max_shard_vectors=500)
    assert len(manifest["index_shards"]) == 6
    storage.write_json(storage.join(out, layout.MANIFEST_NAME), manifest)
    xq = xb[:50] + 0.05 * rng.standard_normal((50, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    before = ShardSearcher(out, manifest, list(range(6)), str(tmp_path / "c1")).search(xq, 10, 50, 32)

    with pytest.raises(CopyscanError, match="crash_at"):
        merge_index_shards(out, 1_200, crash_at=1)
    assert storage.exists(merged_marker_url(out, plan.factory, 0))
    assert (
        storage.read_json(storage.join(out, layout.MANIFEST_NAME))["index_shards"] == manifest["index_shards"]
    )
    first = storage.read_json(merged_marker_url(out, plan.factory, 0))

    merged = merge_index_shards(out, 1_200)
    assert [e["merged_from"] for e in merged["index_shards"]] == [[0, 1], [2, 3], [4, 5]]
    assert storage.read_json(merged_marker_url(out, plan.factory, 0)) == first, "done work is not redone"
    assert sum(e["ntotal"] for e in merged["index_shards"]) == 3_000
    reread = storage.read_json(storage.join(out, layout.MANIFEST_NAME))
    after = ShardSearcher(out, reread, [0, 1, 2], str(tmp_path / "c2")).search(xq, 10, 50, 32)
    # nprobe covers every list: both layouts rank the same candidates exactly
    np.testing.assert_array_equal(after.I, before.I)
    np.testing.assert_allclose(after.D, before.D, atol=1e-6)
    assert after.meta[int(after.I[0, 0])]["index_shard"] in (0, 1, 2)
    assert merge_index_shards(out, 1_200)["index_shards"] == reread["index_shards"], "a rerun is a no-op"


def test_merge_cli_and_an_index_rerun_keeps_the_merged_layout(tmp_path):
    from copyscan.jobs import merge as merge_job

    rng = np.random.default_rng(4)
    d = 16
    out = str(tmp_path / "idx")
    stats = write_collection(out, clustered(2_000, d, 50, rng), 500)
    _, manifest = build(out, stats, d, factory="IVF16,PQ4np", max_shard_vectors=500)
    storage.write_json(storage.join(out, layout.MANIFEST_NAME), manifest)
    assert merge_job.JOB.main(["--index", out, "max_shard_vectors=1000"]) == 0
    merged = storage.read_json(storage.join(out, layout.MANIFEST_NAME))
    assert [e["merged_from"] for e in merged["index_shards"]] == [[0, 1], [2, 3]]
    assert merge_job.JOB.main(["--index", out, "max_shard_vectors=0"]) == 2  # validated up front
    # what a rerun of copyscan index builds from the unmerged shard markers: the merge is kept ...
    assert keep_merged_layout(merged, manifest)["index_shards"] == merged["index_shards"]
    # ... but not for another build, or when the shards changed (a new shard was indexed)
    assert (
        keep_merged_layout(merged, {**manifest, "build_id": "other"})["index_shards"]
        == manifest["index_shards"]
    )
    grown = {**manifest, "index_shards": [*manifest["index_shards"], {"index_shard": 4, "ntotal": 10}]}
    assert keep_merged_layout(merged, grown) is grown
