"""A scan re-ranks as deep, and probes as many lists, as the index was planned for, unless told otherwise."""

import numpy as np
from test_build_search import build, clustered, write_collection

from copyscan.search.scan_config import ScanConfig


def config(**overrides) -> ScanConfig:
    return ScanConfig(index="/idx", queries="/q", out="/out", **overrides)


def manifest(candidates, nprobe, exact=False, recall_target=0.95) -> dict:
    index = {"factory": "IVF4096,PQ64np", "nprobe": nprobe, "candidates": candidates, "exact": exact}
    return {"index": index, "config": {"recall_target": recall_target}}


def test_planned_candidates_and_nprobe_unless_set():
    planned = manifest(200, 16, recall_target=0.97)
    assert config().search_settings(planned) == {
        "candidates": 200,
        "candidates_from": "index plan (recall_target 0.97)",
        "nprobe": 16,
        "nprobe_from": "index plan (recall_target 0.97)",
    }
    assert config(candidates=50, nprobe=4).search_settings(planned) == {
        "candidates": 50,
        "candidates_from": "config",
        "nprobe": 4,
        "nprobe_from": "config",
    }
    # the plan is for recall@10: a larger k still re-ranks at least k per shard
    deep = config(k=300).search_settings(planned)
    assert (deep["candidates"], deep["candidates_from"]) == (
        300,
        "index plan (recall_target 0.97), raised to k",
    )


def test_exact_and_older_indexes_fall_back_to_the_default():
    exact = config(k=20).search_settings(manifest(0, 0, exact=True))
    assert exact == {
        "candidates": 200,
        "candidates_from": "default",
        "nprobe": 0,
        "nprobe_from": "index shards (exact index)",
    }
    older = {"index": {"factory": "IVF1024,PQ32np", "nprobe": 8}, "config": {}}  # no planned candidates
    assert config().search_settings(older) == {
        "candidates": 100,
        "candidates_from": "default",
        "nprobe": 8,
        "nprobe_from": "index plan",
    }


def test_reads_what_the_index_build_records(tmp_path):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "idx")
    stats = write_collection(out, clustered(2_000, 16, 40, rng), 1_000)
    plan, built = build(out, stats, 16, flat_threshold=0, recall_target=0.99, max_code_bytes=4)
    assert plan.candidates and plan.nprobe
    settings = config().search_settings(built)
    assert (settings["candidates"], settings["nprobe"]) == (plan.candidates, plan.nprobe)
    assert settings["candidates_from"].startswith("index plan")
