"""The index planner over a grid of collection sizes: every plan obeys faiss' rules."""

import math
import re
from itertools import pairwise

import pytest

from copyscan.indexing.build.planner import (
    ID_BYTES,
    MIN_POINTS_PER_CENTROID,
    choose_pq_m,
    default_nprobe,
    fixed_shard_bytes,
    group_shards,
    plan_index,
    search_settings,
)
from copyscan.indexing.errors import CopyscanError

SIZES = [1, 10, 999, 5_000, 99_999, 100_000, 250_000, 1_000_000, 10_000_000, 100_000_000, 2_300_000_000]
DIMS = [64, 128, 256, 320, 512, 768, 1024, 1280]
GiB = 1 << 30
BUDGETS = [0, GiB // 4, 4 * GiB, 64 * GiB]
TARGETS = [0.5, 0.9, 0.95, 0.98, 0.99, 0.999]


def _counts(n):
    shards = 1000 if n > 1_000_000 else 1
    return {s: n // shards + (1 if s < n % shards else 0) for s in range(shards)}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dim", DIMS)
def test_plan_obeys_faiss_guidelines(n, dim):
    counts = _counts(n)
    plan = plan_index(counts, dim, flat_threshold=100_000, max_code_bytes=64)
    if n < 100_000:
        assert plan.factory == "IDMap,Flat" and plan.is_flat and plan.nprobe == 0
        return
    match = re.fullmatch(r"IVF(\d+),PQ(\d+)(x\d+)?np", plan.factory)
    assert match, plan.factory
    nlist, m = int(match.group(1)), int(match.group(2))
    assert nlist == plan.nlist and m == plan.pq_m
    assert nlist & (nlist - 1) == 0, "nlist is a power of two"
    assert n >= MIN_POINTS_PER_CENTROID * nlist, "every centroid gets >= 39 training points"
    assert nlist >= 4 * math.sqrt(n) or nlist * 2 * MIN_POINTS_PER_CENTROID > n, (
        "4·√n lists unless too few points"
    )
    assert nlist <= 8 * math.sqrt(n), "the smallest power of two above 4·√n"
    assert dim % m == 0 and m <= 64 and dim // m >= 2
    assert plan.code_bytes <= 64
    assert MIN_POINTS_PER_CENTROID * nlist <= plan.train_size <= min(n, 256 * max(nlist, 256))
    assert 1 <= plan.nprobe <= nlist
    assert plan.candidates >= 10
    assert sum(len(g) for g in plan.shard_groups) == len(counts)
    assert not plan.opq, "whitened vectors (the default) get no OPQ"
    assert plan.ann_bytes == plan.code_bytes + ID_BYTES <= 72


@pytest.mark.parametrize("n", [n for n in SIZES if n >= 100_000])
@pytest.mark.parametrize("dim", [128, 512, 768])
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("whitened", [True, False])
def test_plan_fits_the_memory_budget(n, dim, budget, whitened):
    counts = _counts(n)
    kwargs = dict(shard_memory_bytes=budget, whitened=whitened, max_shard_vectors=10**12)
    m = choose_pq_m(dim, 64)
    per_vector = m + ID_BYTES
    plan_free = plan_index(counts, dim, whitened=whitened)
    fixed = fixed_shard_bytes(plan_free.nlist, dim, plan_free.opq)
    if budget and (budget - fixed) // per_vector < max(counts.values()):
        with pytest.raises(CopyscanError, match="shard_memory_bytes"):
            plan_index(counts, dim, **kwargs)
        return
    plan = plan_index(counts, dim, **kwargs)
    assert plan.opq == (not whitened)
    assert plan.factory.startswith("OPQ") == (not whitened)
    assert plan.factory.endswith(plan_free.factory.split(",", 1)[1] if not whitened else plan_free.factory)
    sizes = [sum(counts[s] for s in g) for g in plan.shard_groups]
    assert [s for g in plan.shard_groups for s in g] == sorted(counts), "every shard once, in order"
    assert plan.shard_count == len(sizes) and sum(sizes) == n
    assert plan.shard_bytes == max(sizes) * per_vector + fixed
    if budget:
        assert plan.shard_bytes <= budget
        assert all(size * per_vector + fixed <= budget for size in sizes)
        # packed: two neighbouring groups would not fit in one shard
        assert all((a + b) * per_vector + fixed > budget for a, b in pairwise(sizes)), (
            "no two neighbouring shards could have been one"
        )
    else:
        assert plan.shard_count == 1


@pytest.mark.parametrize("nlist", [1, 16, 256, 1024, 4096, 65_536, 262_144])
def test_recall_target_sets_nprobe_and_candidates_monotonically(nlist):
    settings = [search_settings(nlist, t) for t in TARGETS]
    for (p0, c0), (p1, c1) in pairwise(settings):
        assert p0 <= p1 and c0 <= c1, settings
    assert all(1 <= p <= nlist and p <= 1024 and c >= 10 for p, c in settings)
    assert search_settings(nlist, 0.95)[0] == default_nprobe(nlist)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(CopyscanError, match="recall_target"):
            search_settings(nlist, bad)


def test_recall_target_reaches_the_plan():
    counts = {0: 1_000_000}
    low, high = plan_index(counts, 512, recall_target=0.9), plan_index(counts, 512, recall_target=0.99)
    assert low.factory == high.factory == "IVF4096,PQ64np"
    assert low.nprobe < high.nprobe and low.candidates < high.candidates
    assert plan_index(counts, 512, recall_target=0.99, nprobe=7).nprobe == 7, "an explicit nprobe wins"


def test_budget_smaller_than_the_centroids_is_refused():
    with pytest.raises(CopyscanError, match="centroids"):
        plan_index({0: 1_000_000}, 512, shard_memory_bytes=1 << 20)
    with pytest.raises(CopyscanError, match=">= 0"):
        plan_index({0: 1_000_000}, 512, shard_memory_bytes=-1)


def test_groups_are_consecutive_and_bounded():
    counts = {i: 300 for i in range(10)}
    groups = group_shards(counts, 1000)
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert group_shards({0: 5000, 1: 10}, 1000) == [[0], [1]]


def test_explicit_factory_needs_np_and_divisible_m():
    counts = {0: 50_000}
    plan = plan_index(counts, 256, factory="IVF256,PQ32np")
    assert plan.nlist == 256 and plan.pq_m == 32 and plan.nprobe == default_nprobe(256)
    with pytest.raises(CopyscanError, match="np"):
        plan_index(counts, 256, factory="IVF256,PQ32")
    with pytest.raises(CopyscanError, match="divide"):
        plan_index(counts, 250, factory="IVF256,PQ32np")
    assert plan_index(counts, 256, factory="Flat").factory == "IDMap,Flat"
    opq = plan_index(counts, 256, factory="OPQ32,IVF256,PQ32np")
    assert opq.opq and opq.nlist == 256 and opq.pq_m == 32 and opq.ann_bytes == 40
    with pytest.raises(CopyscanError, match="np"):
        plan_index(counts, 256, factory="OPQ32,IVF256,PQ32")


def test_empty_collection_is_an_error():
    with pytest.raises(CopyscanError, match="no vectors"):
        plan_index({0: 0, 1: 0}, 128)


def test_choose_pq_m():
    assert choose_pq_m(1280, 64) == 64
    assert choose_pq_m(320, 64) == 64
    assert choose_pq_m(100, 64) == 50
    assert choose_pq_m(7, 64) == 1
