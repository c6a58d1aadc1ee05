"""The index planner over a grid of collection sizes: every plan obeys faiss' rules."""

import math
import re

import pytest

from indexing.errors import CopyscanError
from indexing.planner import (
    MIN_POINTS_PER_CENTROID,
    choose_pq_m,
    default_nprobe,
    group_shards,
    plan_index,
)

SIZES = [1, 10, 999, 5_000, 99_999, 100_000, 250_000, 1_000_000, 10_000_000, 100_000_000, 2_300_000_000]
DIMS = [64, 128, 256, 320, 512, 768, 1024, 1280]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dim", DIMS)
def test_plan_obeys_faiss_guidelines(n, dim):
    shards = 1000 if n > 1_000_000 else 1
    counts = {s: n // shards + (1 if s < n % shards else 0) for s in range(shards)}
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
    assert nlist <= 4 * math.sqrt(n) + 1
    assert dim % m == 0 and m <= 64 and dim // m >= 2
    assert plan.code_bytes <= 64
    assert MIN_POINTS_PER_CENTROID * nlist <= plan.train_size <= min(n, 256 * max(nlist, 256))
    assert 1 <= plan.nprobe <= nlist
    assert sum(len(g) for g in plan.shard_groups) == len(counts)


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


def test_empty_collection_is_an_error():
    with pytest.raises(CopyscanError, match="no vectors"):
        plan_index({0: 0, 1: 0}, 128)


def test_choose_pq_m():
    assert choose_pq_m(1280, 64) == 64
    assert choose_pq_m(320, 64) == 64
    assert choose_pq_m(100, 64) == 50
    assert choose_pq_m(7, 64) == 1
