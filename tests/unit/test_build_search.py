"""Train → fill shards → search with re-ranking, on seeded clustered vectors, against exact search."""

import numpy as np
import pytest

from copyscan.indexing.build.ivf import fill_index_shard, train_phase
from copyscan.indexing.build.planner import plan_index
from copyscan.indexing.build.postprocess import apply_whitening
from copyscan.indexing.embed.stage import EmbeddedSource, finished_shards, write_shard_outputs
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import build_manifest
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.searcher import ShardSearcher


def clustered(n, d, n_clusters, rng, noise=0.35):
    """Unit vectors around random centres: near neighbours are mostly in the same cluster, like image
    descriptors of near-duplicates/similar content; exact top-k is well defined but not trivial."""
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_collection(out, xb, per_shard):
    for shard, start in enumerate(range(0, len(xb), per_shard)):
        part = xb[start : start + per_shard]
        records = [
            {"key": f"{shard:05d}{i:04d}", "url": f"http://img/{shard}/{i}", "caption": f"c{i}"}
            for i in range(len(part))
        ]
        write_shard_outputs(out, shard, f"/shards/{shard:05d}.tar", EmbeddedSource(part, records, []), "fp")
    return finished_shards(out)


def build(out, stats, d, whitening="none", **plan_kwargs):
    counts = {s: st["count"] for s, st in stats.items()}
    plan = plan_index(counts, d, **plan_kwargs)
    info = train_phase(
        out, plan.factory, counts, train_size=plan.train_size, whitening=whitening, background_size=500
    )
    markers = {
        j: fill_index_shard(out, plan.factory, j, g, whitening != "none")
        for j, g in enumerate(plan.shard_groups)
    }
    cfg = {"out": out, "whitening": whitening, "whitening_shrinkage": 0.3}
    spec = {"name": "synthetic", "dim": d, "preprocess": {"kind": "none"}}
    return plan, build_manifest(
        cfg=cfg,
        shards=[st["source"] for _, st in sorted(stats.items())],
        stats=stats,
        spec=spec,
        plan=plan,
        markers=markers,
        train_info=info,
        timings={},
        started_at=0,
    )


@pytest.mark.parametrize("max_shard_vectors", [2_000, 100_000])
def test_ivfpq_with_rerank_recalls_exact_top10(tmp_path, max_shard_vectors):
    rng = np.random.default_rng(0)
    d, n, nq, k = 64, 8_000, 200, 10
    xb = clustered(n, d, 300, rng)
    xq = xb[rng.choice(n, nq, replace=False)] + 0.1 * rng.standard_normal((nq, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 1_500)
    plan, manifest = build(
        out, stats, d, flat_threshold=0, max_shard_vectors=max_shard_vectors, max_code_bytes=8
    )
    assert plan.factory.startswith("IVF") and plan.factory.endswith("np")
    assert len(manifest["index_shards"]) == len(plan.shard_groups)

    searcher = ShardSearcher(
        out, manifest, [e["index_shard"] for e in manifest["index_shards"]], str(tmp_path / "cache")
    )
    assert searcher.ntotal == n
    result = searcher.search(xq, k, candidates=100, nprobe=plan.nprobe)

    # exact ground truth over the fp16 vectors that were stored
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in sorted(stats)]).astype(np.float32)
    gt = np.argsort(-(xq @ stored.T), axis=1)[:, :k]
    shard, row = layout.unpack_ids(result.I)
    found = shard * 1_500 + row
    recall = np.mean([len(set(found[i]) & set(gt[i])) / k for i in range(nq)])
    assert recall >= 0.95, recall
    # scores are the exact cosines of the returned vectors, sorted
    np.testing.assert_allclose(result.D, np.take_along_axis(xq @ stored.T, found, 1), atol=1e-5)
    np.testing.assert_allclose(result.D_raw, result.D, atol=1e-5)  # no whitening: the same space
    assert (np.diff(result.D, axis=1) <= 1e-6).all()
    some = int(result.I[0, 0])
    assert result.meta[some]["train_key"] == f"{some >> 32:05d}{some & 0xFFFFFFFF:04d}"


@pytest.mark.parametrize("whitening", ["none", "pca"])
def test_flat_index_is_exact(tmp_path, whitening):
    rng = np.random.default_rng(1)
    d = 32
    xb = clustered(900, d, 30, rng)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 300)
    plan, manifest = build(out, stats, d, whitening=whitening, flat_threshold=10_000, max_shard_vectors=600)
    assert plan.factory == "IDMap,Flat" and len(manifest["index_shards"]) == 2
    searcher = ShardSearcher(out, manifest, [0, 1])
    xq = xb[:20] + 0.05 * rng.standard_normal((20, d)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    result = searcher.search(xq, 5, candidates=50)
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in range(3)]).astype(np.float32)
    if whitening == "pca":
        assert manifest["whitening"]["fit_vectors"] == 900
        params = storage.load_npz(layout.whitening_url(out, plan.factory))
        space_q, space_b = apply_whitening(params, xq), apply_whitening(params, stored)
    else:
        assert manifest["whitening"] is None
        space_q, space_b = xq, stored
    sims = space_q @ space_b.T
    gt = np.argsort(-sims, axis=1)[:, :5]
    shard, row = layout.unpack_ids(result.I)
    found = shard * 300 + row
    assert (found == gt).mean() > 0.99
    np.testing.assert_allclose(result.D, np.take_along_axis(sims, found, 1), atol=1e-4)
    np.testing.assert_allclose(result.D_raw, np.take_along_axis(xq @ stored.T, found, 1), atol=1e-4)
    assert storage.exists(layout.index_shard_marker_url(out, plan.factory, 1))


def test_score_normalisation_leaves_the_match_out_of_its_background(tmp_path):
    rng = np.random.default_rng(2)
    d = 16
    xb = clustered(400, d, 40, rng)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 400)
    plan, manifest = build(out, stats, d, flat_threshold=10_000)
    assert manifest["background"]["vectors"] == 400  # a small index: all of it is background
    searcher = ShardSearcher(out, manifest, [0])
    xq = xb[:10]  # exact copies of database vectors
    result = searcher.search(xq, 4, candidates=50)
    norm = ScoreNormaliser(out, manifest, beta=1.0)(xq, result.D, result.I)
    sims = xq @ np.load(layout.emb_url(out, 0)).astype(np.float32).T
    for q in range(10):
        for j in range(4):
            others = np.delete(sims[q], int(result.I[q, j]))
            bias = np.sort(others)[::-1][:3].mean()
            assert abs(norm[q, j] - (result.D[q, j] - bias)) < 1e-3
    # the copy itself scores ~1, far above its background
    assert (norm[:, 0] > 0).all()


def test_learned_whitening_uses_the_stored_pairs(tmp_path):
    """Pairs written by the embedding phase are what the learned whitening is fitted on: copies that move
    along a few 'nuisance' directions are matched better after whitening than before."""
    rng = np.random.default_rng(5)
    d, n = 32, 1_200
    xb = clustered(n, d, 40, rng, noise=0.6)
    nuisance = np.linalg.qr(rng.standard_normal((d, 4)))[0].astype(np.float32)  # (d, 4)

    def copy_of(x):
        y = x + (rng.standard_normal((len(x), 4)) * 0.8).astype(np.float32) @ nuisance.T
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)

    out = str(tmp_path / "idx")
    per_shard = 400
    for shard, start in enumerate(range(0, n, per_shard)):
        part = xb[start : start + per_shard]
        records = [{"key": f"{shard}-{i}"} for i in range(len(part))]
        rows = np.repeat(np.arange(100), 2)
        result = EmbeddedSource(part, records, [], x_pair=copy_of(part[rows]), pair_rows=rows)
        stats = write_shard_outputs(out, shard, f"/s/{shard}.tar", result, "fp")
        assert stats["pairs"] == 200
    stats = finished_shards(out)
    plan, manifest = build(out, stats, d, whitening="learned")
    assert manifest["whitening"]["kind"] == "learned" and manifest["whitening"]["pairs"] == 600
    params = storage.load_npz(storage.join(out, manifest["whitening"]["path"]))

    src = rng.choice(n, 300, replace=False)
    queries, truth = copy_of(xb[src]), src
    raw_hits = np.mean(np.argmax(queries @ xb.T, axis=1) == truth)
    white_hits = np.mean(
        np.argmax(apply_whitening(params, queries) @ apply_whitening(params, xb).T, axis=1) == truth
    )
    assert white_hits > raw_hits + 0.05, (raw_hits, white_hits)


def test_learned_whitening_without_pairs_falls_back_to_pca(tmp_path):
    rng = np.random.default_rng(6)
    xb = clustered(600, 16, 20, rng)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 300)
    _, manifest = build(out, stats, 16, whitening="learned")
    assert manifest["whitening"]["kind"] == "pca" and "pairs" in manifest["whitening"]["fallback"]


def test_gather_returns_stored_rows_in_request_order(tmp_path):
    rng = np.random.default_rng(5)
    d = 16
    xb = clustered(900, d, 30, rng)
    out = str(tmp_path / "idx")
    stats = write_collection(out, xb, 300)
    _, manifest = build(out, stats, d, flat_threshold=10_000, max_shard_vectors=600)
    searcher = ShardSearcher(out, manifest, [0, 1])
    shards = rng.integers(0, 3, 500)
    rows = rng.integers(0, 300, 500)
    ids = layout.pack_ids(0, rows) | (shards.astype(np.int64) << 32)  # shards mixed, repeats, unsorted
    ids[::7] = -1
    got = searcher.gather(ids)
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in range(3)]).astype(np.float32)
    want = np.where((ids >= 0)[:, None], stored[shards * 300 + rows], 0.0)
    np.testing.assert_array_equal(got, want)
    assert searcher.gather(np.full(3, -1)).shape == (3, d) and not searcher.gather(np.full(3, -1)).any()


def region_collection(rng, n_images, per_image, d, n_hubs):
    """Region vectors of ``n_images`` images, row ``i · per_image + r``: an image's regions are noisy views of
    its own content (so they resemble each other), and the last region of the first ``n_hubs`` images is a
    noisy copy of one generic vector (sky, texture: a hub near all of them)."""
    centres = rng.standard_normal((n_images, d)).astype(np.float32)
    x = np.repeat(centres, per_image, axis=0) + 0.3 * rng.standard_normal((n_images * per_image, d))
    generic = rng.standard_normal(d).astype(np.float32)
    generic /= np.linalg.norm(generic)
    hubs = np.arange(n_hubs) * per_image + per_image - 1
    x[hubs] = generic + 0.05 * rng.standard_normal((n_hubs, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, generic, hubs


def test_region_densities_and_image_level_background(tmp_path):
    """A region index: each vector's density leaves its own image out; hubs rank below a real match once
    their density is subtracted; score normalisation leaves the hit's whole image out of its background."""
    rng = np.random.default_rng(7)
    R, n_images, d = 4, 100, 32
    xb, generic, hubs = region_collection(rng, n_images, R, d, n_hubs=10)
    out = str(tmp_path / "regions")
    stats = write_collection(out, xb, len(xb))
    counts = {s: st["count"] for s, st in stats.items()}
    plan = plan_index(counts, d, flat_threshold=10_000)
    info = train_phase(
        out, plan.factory, counts, train_size=plan.train_size, whitening="none", background_size=500
    )
    marker = fill_index_shard(out, plan.factory, 0, [0], False, density_per_image=R)
    assert marker["density"]
    density = np.load(layout.density_url(out, plan.factory, 0))
    sims = xb @ xb.T
    image = np.arange(len(xb)) // R
    for row in (0, 5, int(hubs[3]), len(xb) - 1):
        others = sims[row][image != image[row]]  # background = the whole (small) index, own image left out
        assert abs(density[row] - np.sort(others)[::-1][:3].mean()) < 2e-3  # vectors stored as float16
    assert density[hubs].min() > 0.9 > np.delete(density, hubs).max()

    manifest = build_manifest(
        cfg={"out": out, "whitening": "none", "whitening_shrinkage": 0.3},
        shards=["/shards/00000.tar"],
        stats=stats,
        spec={"name": "synthetic", "dim": d, "preprocess": {"kind": "none"}},
        plan=plan,
        markers={0: marker},
        train_info=info,
        timings={},
        started_at=0,
    )
    assert manifest["index"]["region_density"]
    # a query between the generic content and image 50's region 1, a little nearer the generic content
    target = 50 * R + 1
    q = 0.75 * generic + 0.66 * xb[target]
    q = (q / np.linalg.norm(q))[None].astype(np.float32)
    plain = ShardSearcher(out, manifest, [0]).search(q, 5, candidates=100)
    assert int(plain.I[0, 0]) in set(hubs.tolist()) and plain.prior is None
    corrected = ShardSearcher(out, manifest, [0], density_beta=1.0).search(q, 5, candidates=100)
    assert int(corrected.I[0, 0]) // R == 50 and target in corrected.I[0]  # image 50's regions look alike
    assert not set(corrected.I[0, :3].tolist()) & set(hubs.tolist())
    cosine = (q @ xb[corrected.I[0]].T)[0]
    np.testing.assert_allclose(corrected.D[0] + corrected.prior[0], cosine, atol=2e-3)
    mean = manifest["index"]["region_density_mean"]
    assert abs(mean - density.mean()) < 1e-5
    np.testing.assert_allclose(corrected.prior[0], density[corrected.I[0]] - mean, atol=1e-5)

    # an exact copy of region 0 of image 20: its own image's other regions are not its background
    xq = xb[20 * R : 20 * R + 1]
    hit = ShardSearcher(out, manifest, [0]).search(xq, 3, candidates=100)
    assert int(hit.I[0, 0]) == 20 * R
    by_region = ScoreNormaliser(out, manifest, beta=1.0)(xq, hit.D, hit.I)
    by_image = ScoreNormaliser(out, manifest, beta=1.0, per_image=R)(xq, hit.D, hit.I)
    others = (xq @ xb.T)[0][image != 20]
    assert abs(by_image[0, 0] - (hit.D[0, 0] - np.sort(others)[::-1][:3].mean())) < 1e-3
    assert by_image[0, 0] > by_region[0, 0] + 0.2  # the image's own regions had inflated its bias
