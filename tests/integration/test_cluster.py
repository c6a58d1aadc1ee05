"""copyscan on an autoscaling Ray cluster: Ray's fake multi-node autoscaler, a head with no CPUs, and worker
types that start at 0 nodes, one with a (fake) GPU.

``copyscan index`` and ``copyscan scan`` with default settings, attached with ``RAY_ADDRESS``, must make the
autoscaler start worker nodes (GPU ones for embedding), run more than one embedding actor, give the results
of the same run on the session's local Ray, and leave the nodes idle (removed) after. The GPU nodes have no
CUDA device: their embedding actors say so and embed on the CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

WORKER_TYPES = {
    "cpu": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2},
    "gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 2},
}


def _job(head, *args: str, timeout: float = 600) -> str:
    """Run ``python -m copyscan.jobs.ARGS`` attached to ``head``; its log (stderr), after checking it
    succeeded."""
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=head.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stderr


def _nodes_added_and_removed(monitor_log: str) -> tuple[dict[str, int], dict[str, int]]:
    """Nodes the autoscaler added and removed, by node type, from its log."""
    added: dict[str, int] = {}
    removed: dict[str, int] = {}
    for count, kind in re.findall(r"Adding (\d+) node\(s\) of type (\w+)", monitor_log):
        added[kind] = added.get(kind, 0) + int(count)
    for count, kind in re.findall(r"Removing (\d+) nodes of type (\w+)", monitor_log):
        removed[kind] = removed.get(kind, 0) + int(count)
    return added, removed


def _matches(run: Path) -> list[dict]:
    rows = pq.read_table(run / "matches", columns=["query_id", "rank", "train_key", "score"]).to_pylist()
    return sorted(rows, key=lambda r: (r["query_id"], r["rank"]))


def test_index_and_scan_on_an_autoscaling_cluster(ray_session, laion_shards, tmp_path):
    from ray_heads import ray_head

    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.jobs.demo.data import make_generated_images
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    queries = tmp_path / "generated"
    make_generated_images(laion_shards.source_images[:6], [], str(queries), n_copies=6, n_unrelated=0, seed=3)
    local_index, local_scan = tmp_path / "local-index", tmp_path / "local-scan"
    run_index(resolve(IndexConfig, {"shards": laion_shards.folder, "out": str(local_index)}))
    run_scan(
        resolve(ScanConfig, {"index": str(local_index), "queries": str(queries), "out": str(local_scan)})
    )

    index, scan = tmp_path / "index", tmp_path / "scan"
    with ray_head(0, worker_types=WORKER_TYPES) as head:
        log = _job(head, "copyscan.jobs.index", "--shards", laion_shards.folder, "--out", str(index))
        log += _job(
            head, "copyscan.jobs.scan", "--index", str(index), "--queries", str(queries), "--out", str(scan)
        )
        added, _ = _nodes_added_and_removed(head.monitor_log())
        # every node goes idle once the jobs end, and the autoscaler removes it
        deadline = time.time() + 120
        while (removed := _nodes_added_and_removed(head.monitor_log())[1]) != added:
            assert time.time() < deadline, f"nodes added {added}, removed only {removed}"
            time.sleep(2)

    assert added.get("gpu", 0) >= 1, added  # embedding asked for GPUs the cluster had none of at the start
    peaks = [
        int(n)
        for n in re.findall(r"embed: up to \d+ actor\(s\) of 1 GPU, .*; (\d+) actor\(s\) at the peak", log)
    ]
    assert peaks and max(peaks) >= 2, log[-4000:]
    assert "torch sees no CUDA device: embedding on CPU" in log

    manifest = json.loads((index / "manifest.json").read_text())
    local_manifest = json.loads((local_index / "manifest.json").read_text())
    assert manifest["ntotal"] == local_manifest["ntotal"] == len(laion_shards.key_of_source)
    for entry, local_entry in zip(
        manifest["embedding_shards"], local_manifest["embedding_shards"], strict=True
    ):
        keys = pq.read_table(index / entry["metadata"], columns=["key"]).column("key").to_pylist()
        local_keys = (
            pq.read_table(local_index / local_entry["metadata"], columns=["key"]).column("key").to_pylist()
        )
        assert keys == local_keys  # every image of every shard, once
        np.testing.assert_allclose(
            np.load(index / entry["img_emb"]).astype(np.float32),
            np.load(local_index / local_entry["img_emb"]).astype(np.float32),
            atol=2e-3,
        )
    got, want = _matches(scan), _matches(local_scan)
    assert [(r["query_id"], r["rank"], r["train_key"]) for r in got] == [
        (r["query_id"], r["rank"], r["train_key"]) for r in want
    ]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)
