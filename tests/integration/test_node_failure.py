"""A worker node lost in the middle of ``copyscan index`` and of ``copyscan scan``.

A head with no CPUs and three 1-CPU worker nodes (Ray's fake multi-node provider starts them: min_workers). While the index job embeds, the node holding an
embedding actor in the middle of a shard is killed (SIGKILL to its raylet and everything it started: workers,
agents, object store); once the scan has started its scan actor (it holds the index; the searches of a chunk
take milliseconds, the embedding of the next one seconds), that actor's node. Both jobs must finish, with every image of every shard
in the index exactly once and the matches of a clean run on the session's local Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

INDEX_SETTINGS = ["embed_actors=2", "batch_size=4"]
SCAN_SETTINGS = ["batch_size=4", "chunk_size=3"]


WORKER_TYPES = {"cpu": {"resources": {"CPU": 1}, "min_workers": 3, "max_workers": 3}}


def _run_losing_a_node(head, method: str, log: Path, *args: str, settings: list[str]) -> str:
    """``python -m copyscan.jobs.ARGS`` attached to ``head``; once an actor runs ``method`` (``Class.method``:
    the title Ray gives its process meanwhile; ``Class``: the actor exists), that actor's node is lost.
    Returns the job's log, after checking that the job succeeded."""
    from ray_heads import actor_processes, kill_node_of

    with log.open("w") as err:
        job = subprocess.Popen(
            [sys.executable, "-m", *args, *settings], cwd=REPO, env=head.env(), stderr=err, text=True
        )
        try:
            deadline = time.time() + 300
            while not (pids := actor_processes(head, method)):
                assert job.poll() is None, f"the job ended before a node was lost:\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, f"no actor ran {method} in 300 s:\n{log.read_text()[-4000:]}"
                time.sleep(0.2)
            kill_node_of(pids[0])
            assert job.wait(timeout=600) == 0, log.read_text()[-6000:]
        finally:
            if job.poll() is None:
                job.kill()
    return log.read_text()


def _keys(index: Path) -> list[list[str]]:
    manifest = json.loads((index / "manifest.json").read_text())
    return [
        pq.read_table(index / e["metadata"], columns=["key"]).column("key").to_pylist()
        for e in manifest["embedding_shards"]
    ]


def _matches(run: Path) -> list[dict]:
    rows = pq.read_table(run / "matches", columns=["query_id", "rank", "train_key", "score"]).to_pylist()
    return sorted(rows, key=lambda r: (r["query_id"], r["rank"]))


def test_index_and_scan_survive_a_lost_node(ray_session, laion_shards, tmp_path):
    from ray_heads import ray_head, wait_for_nodes

    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import parse_overrides, resolve
    from copyscan.jobs.demo.data import make_generated_images
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    queries = tmp_path / "generated"
    make_generated_images(
        laion_shards.source_images[:12], [], str(queries), n_copies=12, n_unrelated=0, seed=4
    )
    index_keys, scan_keys = parse_overrides(INDEX_SETTINGS), parse_overrides(SCAN_SETTINGS)
    clean_index, clean_scan = tmp_path / "clean-index", tmp_path / "clean-scan"
    run_index(resolve(IndexConfig, {"shards": laion_shards.folder, "out": str(clean_index), **index_keys}))
    run_scan(
        resolve(
            ScanConfig,
            {"index": str(clean_index), "queries": str(queries), "out": str(clean_scan), **scan_keys},
        )
    )

    index, scan = tmp_path / "index", tmp_path / "scan"
    # a cluster each: the fake provider does not notice a lost node, so it would not replace it for the scan
    with ray_head(0, worker_types=WORKER_TYPES) as head:
        wait_for_nodes(head, 4)
        index_log = _run_losing_a_node(
            head, "EmbedWorker.embed_shard", tmp_path / "index.log", "copyscan.jobs.index",
            "--shards", laion_shards.folder, "--out", str(index), settings=INDEX_SETTINGS,
        )  # fmt: skip
    with ray_head(0, worker_types=WORKER_TYPES) as head:
        wait_for_nodes(head, 4)
        scan_log = _run_losing_a_node(
            head, "ScanWorker", tmp_path / "scan.log", "copyscan.jobs.scan", "--index", str(index),
            "--queries", str(queries), "--out", str(scan), settings=SCAN_SETTINGS,
        )  # fmt: skip

    assert "died" in index_log  # the lost node's actor was replaced and its shard in flight retried
    assert "scan actor died" in scan_log
    keys = _keys(index)
    assert keys == _keys(clean_index)  # every image of every shard, exactly once, in the same rows
    assert sum(map(len, keys)) == len({k for shard in keys for k in shard}) == len(laion_shards.key_of_source)
    got, want = _matches(scan), _matches(clean_scan)
    assert [(r["query_id"], r["rank"], r["train_key"]) for r in got] == [
        (r["query_id"], r["rank"], r["train_key"]) for r in want
    ]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)
