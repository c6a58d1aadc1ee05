"""Faults during ``copyscan index`` and ``copyscan scan``: actors and drivers killed, and a second writer.

The jobs run as real drivers (``python -m copyscan.jobs.X``, attached to the session's Ray with
``RAY_ADDRESS``) on the smallest data that goes through every phase: 3 shards of 4 images, 8 generations
scanned one per chunk with pixel verification (8, not 4: a scan's chunks are embedded two at a time and
can be written within milliseconds of each other, so a run killed at its first chunk written may have
written two, and a run of 4 chunks was seen to end with all 4 written before its kill landed). Each
faulted job is run again and again, each run killed
(SIGKILL, its process group) when it reaches the next phase, seen in its log or its output files, and one
of its actors killed (SIGKILL of the actor's worker: to Ray, the same as ``ray.kill``) in the middle of its
work, until a last run finishes. The result must equal a clean run's: every image of every shard indexed
exactly once, in the same rows, the same manifest counts, the same matches (query_id, rank, train_key;
scores to 1e-5), and no temporary file of a killed writer left in the output. A second run started on an
output while one runs is refused (the lease, ``indexing/store/lease.py``), on local files and on S3.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
INDEX_SETTINGS = ["embed_concurrency=1", "batch_size=2"]
SCAN_SETTINGS = ["chunk_size=1", "batch_size=1", "verify_pixels=1", "verify_in_flight=1", "verify_size=64"]

pytestmark = pytest.mark.slow
# the process titles of a job's actors and tasks on Ray's workers (ray::TITLE)
JOB_WORK = (
    "EmbedWorker",
    "ScanWorker",
    "write_chunk",
    "train_phase",
    "fill_index_shard",
    "embedder_spec",
    "_decode_source",
)


class Driver:
    """A job's driver as a subprocess attached to the session's Ray, its stderr in ``log``."""

    def __init__(self, log: Path, module: str, *args: str):
        import ray

        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, reached: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Poll until ``reached()``; fails if the driver ends first."""
        deadline = time.time() + timeout
        while not reached():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            assert time.time() < deadline, f"no {what} in {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the driver (and anything in its process group); returns once Ray has ended its actors
        (the next run must not meet them)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        # Ray ends the dead driver's actors and tasks within moments; a task caught in the middle of a write
        # may still finish it (the same bytes a rerun writes: a chunk is deterministic)
        _until_ended("the killed driver's actors and tasks")

    def finish(self) -> str:
        assert self.proc.wait(timeout=300) == 0, self.text()[-4000:]
        return self.text()


def _actor_pids(title: str) -> list[int]:
    """Worker processes of this session's Ray (descendants of this process, which started it) whose title
    starts with ``ray::{title}``."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(entry.name)] = (parent, cmd)

    def ours(pid: int) -> bool:
        while pid > 1 and pid in procs:
            if pid == os.getpid():
                return True
            pid = procs[pid][0]
        return False

    return [
        p
        for p, (_, cmd) in procs.items()
        if cmd.startswith(f"ray::{title}") and not cmd.startswith("ray::IDLE") and ours(p)
    ]


def _kill_actor(title: str) -> Callable[[], bool]:
    """A ``wait_for`` condition: kills the first actor titled ``ray::{title}`` once there is one."""

    def reached() -> bool:
        pids = _actor_pids(title)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
        return bool(pids)

    return reached


def _logged(driver: Driver, line: str) -> Callable[[], bool]:
    return lambda: line in driver.text()


def _files(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.exists() else []


def _more(folder: Path, pattern: str) -> Callable[[], bool]:
    """A ``wait_for`` condition: more files ``folder/pattern`` than now."""
    before = len(_files(folder, pattern))
    return lambda: len(_files(folder, pattern)) > before


def _temporaries(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*.tmp-*")]


@pytest.fixture(scope="module")
def small_shards(real_images, tmp_path_factory):
    """3 webdataset shards of 4 real images each (160 px JPEGs, caption, json), and 8 generations: copies
    of the images of the first two shards."""
    from PIL import Image

    from copyscan.jobs.demo.data import make_generated_images

    root = tmp_path_factory.mktemp("faults")
    shards = root / "shards"
    shards.mkdir()
    sources = list(real_images[:12])
    for s in range(3):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i, path in enumerate(sources[4 * s : 4 * s + 4]):
                key = f"{s:04d}{i:05d}"
                image = io.BytesIO()
                Image.open(path).convert("RGB").resize((160, 160)).save(image, "JPEG", quality=90)
                meta = json.dumps({"url": f"http://example.invalid/{key}.jpg", "key": key}).encode()
                for ext, blob in (
                    ("jpg", image.getvalue()),
                    ("txt", f"image {key}".encode()),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    queries = root / "generated"
    make_generated_images(sources[:8], [], str(queries), n_copies=8, n_unrelated=0, seed=5)
    return shards, queries


def _keys(index: Path) -> list[list[str]]:
    manifest = json.loads((index / "manifest.json").read_text())
    return [
        pq.read_table(index / e["metadata"], columns=["key"]).column("key").to_pylist()
        for e in manifest["embedding_shards"]
    ]


def _counts(manifest: dict) -> tuple:
    return (
        manifest["ntotal"],
        [(e["count"], e["samples"], e["rejected"]) for e in manifest["embedding_shards"]],
        [(e["index_shard"], e["ntotal"]) for e in manifest["index_shards"]],
    )


def _matches(run: Path) -> list[dict]:
    rows = pq.read_table(run / "matches", columns=["query_id", "rank", "train_key", "score"]).to_pylist()
    return sorted(rows, key=lambda r: (r["query_id"], r["rank"]))


def _assert_same_matches(got: list[dict], want: list[dict]) -> None:
    assert [(r["query_id"], r["rank"], r["train_key"]) for r in got] == [
        (r["query_id"], r["rank"], r["train_key"]) for r in want
    ]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-5)


@pytest.fixture(scope="module")
def clean(ray_session, small_shards, tmp_path_factory):
    """A clean index of ``small_shards`` and a clean scan of its generations, run in this process."""
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import parse_overrides, resolve
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    shards, queries = small_shards
    root = tmp_path_factory.mktemp("clean")
    index, scan = root / "index", root / "scan"
    manifest = run_index(
        resolve(IndexConfig, {"shards": str(shards), "out": str(index), **parse_overrides(INDEX_SETTINGS)})
    )
    summary = run_scan(
        resolve(
            ScanConfig,
            {
                "index": str(index),
                "queries": str(queries),
                "out": str(scan),
                **parse_overrides(SCAN_SETTINGS),
            },
        )
    )
    _until_ended("the clean runs' actors and tasks")
    return index, manifest, scan, summary


def _until_ended(whose: str, timeout: float = 60) -> None:
    """Wait until no actor or task of a job runs on the session's Ray (the next run must not meet them)."""
    gc.collect()  # actor handles in reference cycles keep their actors alive until collected
    deadline = time.time() + timeout
    while busy := [p for title in JOB_WORK for p in _actor_pids(title)]:
        assert time.time() < deadline, f"{whose} still run after {timeout} s: {busy}"
        time.sleep(0.1)


def test_index_survives_killed_actor_and_drivers(clean, small_shards, tmp_path):
    """Driver killed while embedding (one shard done), an embedding actor killed mid-shard on the rerun
    and its driver killed once training starts, the next killed once filling starts; a last run finishes.
    Meanwhile a second ``copyscan index`` on the same output is refused."""
    from copyscan.indexing.errors import CopyscanError
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import parse_overrides, resolve

    shards, _ = small_shards
    out = tmp_path / "index"
    args = ("copyscan.jobs.index", "--shards", str(shards), "--out", str(out), *INDEX_SETTINGS)
    markers = out / "embeddings" / "stats"

    embedding = Driver(tmp_path / "1-embedding.log", *args)
    embedding.wait_for(lambda: _files(markers, "stats_*.json"), "first embedded shard")
    with pytest.raises(CopyscanError, match=r"is being written by another run: copyscan index"):
        run_index(
            resolve(IndexConfig, {"shards": str(shards), "out": str(out), **parse_overrides(INDEX_SETTINGS)})
        )
    embedding.kill()
    assert 1 <= len(_files(markers, "stats_*.json")) < 3

    training = Driver(tmp_path / "2-training.log", *args)  # resumed at once: the lease's process is gone
    training.wait_for(_kill_actor("EmbedWorker.embed_shard"), "embedding actor at work")
    training.wait_for(_logged(training, "train: started"), "training")
    training.kill()
    assert "died" in training.text()  # the killed actor's shard was retried on a new actor
    assert not (out / "manifest.json").exists()

    filling = Driver(tmp_path / "3-filling.log", *args)
    filling.wait_for(_logged(filling, "fill: started"), "filling")
    filling.kill()

    log = Driver(tmp_path / "4-last.log", *args).finish()
    assert "embed: 3 of 3 shards already done" in log
    clean_index, clean_manifest, _, _ = clean
    manifest = json.loads((out / "manifest.json").read_text())
    assert _counts(manifest) == _counts(clean_manifest)
    keys = _keys(out)
    assert keys == _keys(clean_index)  # every image of every shard, exactly once, in the same rows
    assert sum(map(len, keys)) == len({k for shard in keys for k in shard}) == 12
    for e in manifest["index_shards"]:
        assert (out / e["path"]).exists()
    assert _temporaries(out) == [] and not (out / "_lease.json").exists()


def test_scan_survives_killed_actor_and_drivers(clean, small_shards, tmp_path):
    """Driver killed while embedding, a scan actor killed and the driver killed while the chunk's search
    is retried, while a chunk is verified, once a chunk is written; a last run finishes. Meanwhile a second
    ``copyscan scan`` on the same output is refused."""
    from copyscan.indexing.errors import CopyscanError
    from copyscan.indexing.runtime.config import parse_overrides, resolve
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    clean_index, _, clean_scan, clean_summary = clean
    _, queries = small_shards
    out = tmp_path / "scan"
    args = ("copyscan.jobs.scan", "--index", str(clean_index), "--queries", str(queries), "--out", str(out))
    args += tuple(SCAN_SETTINGS)

    embedding = Driver(tmp_path / "1-embedding.log", *args)
    embedding.wait_for(lambda: _actor_pids("EmbedWorker.embed"), "embedding actor at work")
    cfg = {"index": str(clean_index), "queries": str(queries), "out": str(out)}
    with pytest.raises(CopyscanError, match=r"is being written by another run: copyscan scan"):
        run_scan(resolve(ScanConfig, {**cfg, **parse_overrides(SCAN_SETTINGS)}))
    embedding.kill()

    searching = Driver(tmp_path / "2-searching.log", *args)
    searching.wait_for(_logged(searching, "scan actor(s) hold"), "scan actors ready")
    searching.wait_for(_kill_actor("ScanWorker"), "scan actor")
    searching.wait_for(_logged(searching, "scan actor died"), "search retried")
    searching.kill()

    verifying = Driver(tmp_path / "3-verification.log", *args)
    # a verification task writes the chunk's query vectors, verifies, then writes its matches and marker
    verifying.wait_for(_more(out / "query_emb", "query_emb_*.npy"), "chunk in verification")
    verifying.kill()

    writing = Driver(tmp_path / "4-writing.log", *args)
    writing.wait_for(_more(out / "chunks", "chunk_*.json"), "chunk written")
    writing.kill()
    assert len(_files(out / "chunks", "chunk_*.json")) < 8

    Driver(tmp_path / "5-last.log", *args).finish()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("queries", "embedded", "rejected", "matches"):
        assert summary[key] == clean_summary[key], key
    _assert_same_matches(_matches(out), _matches(clean_scan))
    assert _temporaries(out) == [] and not (out / "_lease.json").exists()

    # copyscan report, killed once it writes its first table, then run again: the clean run's report
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.report.run import run_report

    report_args = ("copyscan.jobs.report", str(out), "train_sample=12", "resamples=50")
    reporting = Driver(tmp_path / "6-report.log", *report_args)
    reporting.wait_for(_more(out / "report", "*.parquet"), "report tables written")
    reporting.kill()
    Driver(tmp_path / "7-report.log", *report_args).finish()
    clean_report = run_report(
        resolve(ReportConfig, {"run": str(clean_scan), **parse_overrides(report_args[2:])})
    )
    got = json.loads((out / "report" / "stats.json").read_text().replace(str(out), str(clean_scan)))
    for run_dependent in ("seconds", "created_at"):
        got.pop(run_dependent), clean_report.pop(run_dependent)
    assert got == json.loads(json.dumps(clean_report))
    for table in ("histograms", "similarities", "duplicates"):
        assert pq.read_table(out / "report" / f"{table}.parquet").equals(
            pq.read_table(clean_scan / "report" / f"{table}.parquet")
        ), table
    assert _temporaries(out) == []


def test_a_second_writer_is_refused_on_s3(ray_session, s3_server, small_shards):
    """On object storage too: a run holding the lease refuses a second index; a dead holder's lease (its
    heartbeat older than the timeout) is taken over."""
    from copyscan.indexing.errors import CopyscanError
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store import lease, storage
    from copyscan.indexing.store.outputs import output_lease

    so = s3_server.storage_options
    out = f"s3://{s3_server.make_bucket('lease')}/index"
    shards, _ = small_shards
    cfg = resolve(IndexConfig, {"shards": str(shards), "out": out, "storage_options": so})
    with output_lease(out, "index", "index.yaml", so) as held:
        with pytest.raises(CopyscanError, match=rf"{out} is being written by another run: copyscan index"):
            run_index(cfg)
        assert held.holds()
    assert lease.read_lease(out, so) is None
    stale = {"job": "scan", "token": "t", "machine": "gone", "pid": 1, "heartbeat_at": time.time() - 500}
    storage.write_json(storage.join(out, lease.LEASE_NAME), stale, so)
    with output_lease(out, "index", "index.yaml", so) as taken:
        assert lease.read_lease(out, so)["token"] == taken.record["token"]
