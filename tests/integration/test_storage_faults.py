"""Storage faults. Object storage: a fault-injecting proxy (tests/integration/s3_faults.py) in front of the loopback
S3 server, given to copyscan as ``storage_options.endpoint_url``.

503 SlowDown, connection resets, slow answers, bodies lost mid-way and bodies cut short without a word are
retried (botocore and s3fs for the first four, copyscan's length checks for the last) and the index and
scan equal a clean run's; a shard or query chunk that keeps failing is named and fails the job once the
rest are done. Each test asserts the faults it scheduled were really injected. The output's own faults
(a path that cannot be written, a full disk) fail naming the path, with nothing half-written taken as done
(tests/unit/test_output_errors.py tests the writes themselves).
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from s3_faults import Fault, FaultProxy

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.index_ray import run_index
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import layout, storage
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_ray import run_scan

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as p:
        yield p


def _options(proxy: FaultProxy, **extra) -> dict:
    return {"endpoint_url": proxy.url, "key": "testing", "secret": "testing", **extra}


def _tar(n: int, size: int) -> bytes:
    rng = np.random.default_rng(n)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, data in (("jpg", rng.bytes(size)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_defaults_apply_once_and_yield_to_the_users_settings():
    so = storage.with_defaults("s3://b/x", {"config_kwargs": {"retries": {"max_attempts": 3}}})
    assert so["config_kwargs"]["retries"] == {"max_attempts": 3}  # the user's, whole
    assert so["config_kwargs"]["read_timeout"] == storage.S3_CONFIG_DEFAULTS["read_timeout"]
    assert storage.with_defaults("/local/x", {}) == {}
    fs, _ = storage.get_fs("s3://b/x", {"endpoint_url": "http://127.0.0.1:9"})
    assert fs.storage_options["config_kwargs"] == storage.S3_CONFIG_DEFAULTS


def test_object_store_writes_go_to_the_final_name(s3_server, proxy, tmp_path):
    """On an object store an upload appears whole when it completes: no temporary object, no copy."""
    bucket = s3_server.make_bucket("final")
    so = _options(proxy)
    local = tmp_path / "part.npy"
    local.write_bytes(os.urandom(100_000))
    proxy.set_schedule([])
    storage.write_json(f"s3://{bucket}/out/manifest.json", {"a": 1}, so)
    storage.upload_file(str(local), f"s3://{bucket}/out/part.npy", so)
    writes = [path for method, path, _ in proxy.log if method in ("PUT", "POST", "DELETE")]
    assert writes and all(".tmp-" not in path for path in writes), writes
    assert storage.read_json(f"s3://{bucket}/out/manifest.json", so) == {"a": 1}
    assert storage.read_bytes(f"s3://{bucket}/out/part.npy", so) == local.read_bytes()


@pytest.mark.parametrize("kind", ["slowdown", "reset", "slow", "truncate", "short"])
def test_each_fault_is_retried_on_reads_and_writes(s3_server, proxy, kind):
    """Whole objects (markers, manifests, .npy, query files), tars streamed by blocks, and writes."""
    bucket = s3_server.make_bucket("faults")
    so = _options(proxy)
    blob, tar = os.urandom(600_000), _tar(12, 40_000)
    storage.write_bytes(f"s3://{bucket}/blob", blob, so)
    storage.write_bytes(f"s3://{bucket}/shard.tar", tar, so)
    want = [(s.key, s.image, s.caption) for s in iter_tar(f"s3://{bucket}/shard.tar", so)]
    assert len(want) == 12

    proxy.set_schedule([Fault(kind, method=None, path=f"/{bucket}/", every=2, times=3, delay=0.3)])
    storage.write_bytes(f"s3://{bucket}/written", blob, so)
    assert storage.read_bytes(f"s3://{bucket}/blob", so) == blob
    assert storage.read_bytes(f"s3://{bucket}/written", so) == blob
    # A tar is streamed in blocks: a cut block fails the read (the shard's task is retried), never a
    # shifted stream read on as if whole.
    for _attempt in range(3):
        try:
            got = [(s.key, s.image, s.caption) for s in iter_tar(f"s3://{bucket}/shard.tar", so)]
            break
        except CopyscanError as exc:
            assert kind in ("short", "truncate"), exc
            assert "cut short" in str(exc) or "checksum" in str(exc), exc
    assert got == want
    assert proxy.injected() == {kind: 3}


def test_a_short_body_goes_unnoticed_without_the_length_check(s3_server, proxy):
    """Why copyscan checks lengths: a ranged GET whose body and Content-Length were both cut comes back
    from s3fs as fewer bytes, no error (botocore checks no checksum on a part of an object)."""
    bucket = s3_server.make_bucket("short")
    so = _options(proxy)
    blob = os.urandom(300_000)
    storage.write_bytes(f"s3://{bucket}/blob", blob, so)
    fs, path = storage.get_fs(f"s3://{bucket}/blob", so)
    proxy.set_schedule([Fault("short", path=f"/{bucket}/blob")])
    # read(150 kB) fetches bytes 0-200 kB of 300 kB (the read and one block ahead); half come back
    with fs.open(path, "rb", block_size=50_000) as f:
        assert len(f.read(150_000)) == 100_000  # no error
    proxy.set_schedule([Fault("short", path=f"/{bucket}/blob")])
    with fs.open(path, "rb", block_size=50_000) as f:
        with pytest.raises(storage.TruncatedRead, match="cut short"):
            storage.CheckedReader(f, f"s3://{path}").read(150_000)
    proxy.set_schedule([Fault("short", path=f"/{bucket}/blob", times=None)])
    with pytest.raises(CopyscanError, match=f"reading s3://{bucket}/blob failed 4 times"):
        storage.read_bytes(f"s3://{bucket}/blob", so)
    assert proxy.injected() == {"short": 4}


# ---------------------------------------------------------------------------------------------------------
# index and scan on Ray, through the proxy


def _index(shards: str, out: str, **overrides) -> dict:
    return run_index(resolve(IndexConfig, {"shards": shards, "out": out, **overrides}))


def _scan(index_url: str, queries: str, out: str, **overrides) -> dict:
    return run_scan(resolve(ScanConfig, {"index": index_url, "queries": queries, "out": out, **overrides}))


def _matches(out: str, storage_options=None) -> dict[tuple[str, int], tuple[str, float]]:
    fs, path = storage.get_fs(out, storage_options)
    table = pq.read_table(storage.join(path, "matches"), filesystem=fs if "://" in out else None)
    return {(r["query_id"], r["rank"]): (r["train_key"], r["score"]) for r in table.to_pylist()}


def _assert_same_matches(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert {q: key for q, (key, _) in got.items()} == {q: key for q, (key, _) in want.items()}
    np.testing.assert_allclose([got[q][1] for q in want], [want[q][1] for q in want], atol=1e-5)


@pytest.fixture(scope="module")
def clean_run(ray_session, laion_shards, generated, tmp_path_factory):
    """The clean run the faulty ones must equal: index and scan of the same shards and images, locally."""
    folder, _ = generated
    work = tmp_path_factory.mktemp("clean")
    manifest = _index(laion_shards.folder, str(work / "idx"), max_shard_vectors=20)
    summary = _scan(str(work / "idx"), str(folder), str(work / "scan"), chunk_size=4)
    return str(work / "idx"), manifest, summary, _matches(str(work / "scan"))


def _upload_queries(folder: Path, url: str, storage_options: dict) -> None:
    for f in sorted(folder.glob("*.jpg")):
        storage.upload_file(str(f), f"{url}/{f.name}", storage_options)


INDEX_FAULTS = [
    Fault("short", "GET", path=".tar", every=2, times=2),
    Fault("slowdown", "GET", path=".tar", every=2, times=2),
    Fault("truncate", "GET", path="/idx-faults/", every=4, times=3),
    Fault("reset", None, path="/idx-faults/", every=5, times=3),
    Fault("slowdown", "PUT", path="/idx-faults/", every=7, times=2),
    Fault("slow", None, path="/idx-faults/", every=9, times=3, delay=0.5),
]
SCAN_FAULTS = [
    Fault("short", "GET", path="/q/", every=3, times=2),
    Fault("reset", "GET", path="/q/", every=3, times=2),
    Fault("truncate", "GET", path="/idx-faults/", every=3, times=3),
    Fault("slowdown", None, path="/scan-faults/", every=3, times=3),
    Fault("reset", "PUT", path="/scan-faults/", every=4, times=2),
    Fault("slow", None, path="/scan-faults/", every=5, times=2, delay=0.5),
]
EVERY_KIND = {"short", "slowdown", "truncate", "reset", "slow"}


@pytest.mark.slow
def test_index_and_scan_survive_faults_and_name_what_keeps_failing(
    ray_session, s3_server, laion_shards_s3, generated, clean_run, proxy
):
    """Index, then scan, through the proxy, each run twice:

    1. with every kind of fault several times, and one tar (one query image) that answers 503 SlowDown
       forever: every other shard (query chunk) finishes, then the job fails naming the dead one, and no
       manifest (no marker of the dead chunk) is written;
    2. once that object recovers, rerun with the transient faults again: it resumes, and the index (the
       matches) equals the clean run's.
    """
    clean_url, clean, clean_summary, clean_matches = clean_run
    bucket = laion_shards_s3.bucket
    # the user's retry settings win over copyscan's defaults: 2 attempts, so that giving up takes seconds
    so = _options(proxy, config_kwargs={"retries": {"max_attempts": 2, "mode": "standard"}})
    index_url, run_url = f"s3://{bucket}/idx-faults", f"s3://{bucket}/scan-faults"

    dead = laion_shards_s3.shard_urls[2].split("://", 1)[1]
    proxy.set_schedule([Fault("slowdown", "GET", path=f"/{dead}", times=None), *INDEX_FAULTS])
    with pytest.raises(CopyscanError) as error:
        _index(laion_shards_s3.pattern, index_url, max_shard_vectors=20, retries=1, storage_options=so)
    assert "1 shard(s) failed after 2 attempts" in str(error.value)
    assert f"shard 00002 (s3://{dead}): " in str(error.value)
    assert sorted(storage.read_markers(layout.stats_dir(index_url), "stats_", so)) == [0, 1, 3]
    assert not storage.exists(storage.join(index_url, layout.MANIFEST_NAME), so)
    faults = proxy.injected()

    proxy.set_schedule(INDEX_FAULTS)
    manifest = _index(laion_shards_s3.pattern, index_url, max_shard_vectors=20, storage_options=so)
    faults = {k: faults.get(k, 0) + proxy.injected().get(k, 0) for k in EVERY_KIND}
    assert manifest["ntotal"] == clean["ntotal"]
    assert [e["count"] for e in manifest["embedding_shards"]] == [
        e["count"] for e in clean["embedding_shards"]
    ]
    for shard in range(len(clean["embedding_shards"])):
        np.testing.assert_array_equal(
            storage.load_npy(layout.emb_url(index_url, shard), so), np.load(layout.emb_url(clean_url, shard))
        )

    _upload_queries(generated[0], f"s3://{bucket}/q", s3_server.storage_options)
    first = storage.list_files(f"s3://{bucket}/q", so)[0].split("://", 1)[1]
    proxy.set_schedule([Fault("slowdown", "GET", path=f"/{first}", times=None), *SCAN_FAULTS])
    with pytest.raises(
        CopyscanError, match=r"1 query chunk\(s\) failed; rerun to resume:\n  query chunk 00000"
    ):
        _scan(index_url, f"s3://{bucket}/q", run_url, chunk_size=4, retries=1, storage_options=so)
    summary = storage.read_json(layout.summary_url(run_url), so)
    assert [c["chunk"] for c in summary["failed_chunks"]] == [0]
    assert "reduce your request rate" in summary["failed_chunks"][0]["error"]  # SlowDown's message
    assert summary["chunks"] == summary["chunks_total"] - 1  # every other chunk finished
    faults = {k: faults[k] + proxy.injected().get(k, 0) for k in EVERY_KIND}

    proxy.set_schedule(SCAN_FAULTS)
    summary = _scan(index_url, f"s3://{bucket}/q", run_url, chunk_size=4, storage_options=so)
    faults = {k: faults[k] + proxy.injected().get(k, 0) for k in EVERY_KIND}
    assert summary["failed_chunks"] == []
    assert (summary["queries"], summary["matches"]) == (clean_summary["queries"], clean_summary["matches"])
    _assert_same_matches(_matches(run_url, so), clean_matches)
    assert all(faults[k] >= 4 for k in EVERY_KIND), faults  # besides the dead objects' endless 503s


def test_decode_tasks_that_wait_on_storage_get_more_shards_in_flight(
    ray_session, laion_shards_s3, proxy, tmp_path, caplog
):
    """Shards whose GETs answer a second late: their decode tasks mostly wait, so the fan-out
    (indexing/embed/fanout.py) keeps more shards in flight per actor than the 2 it starts with, within the
    CPUs' room for tasks on a core that small share of their time. Shard 1 answers 3 s late, so it is still
    running when shard 0's stats raise the count and shards 2 and 3 start beside it. (bench.fanout_storage
    measures what this gains.)"""
    slow_one = laion_shards_s3.shard_urls[1].split("://", 1)[1]
    proxy.set_schedule(
        [
            Fault("slow", "GET", path=f"/{slow_one}", times=None, delay=3.0),
            Fault("slow", "GET", path=".tar", times=None, delay=1.0),
        ]
    )
    out = tmp_path / "idx"
    with caplog.at_level("INFO", logger="copyscan"):
        _index(laion_shards_s3.pattern, str(out), whitening="none", storage_options=_options(proxy))
    assert proxy.injected()["slow"] >= 4
    lines = [r.getMessage() for r in caplog.records if "in flight per actor" in r.getMessage()]
    counts = [int(re.search(r"ms: (\d+) shard\(s\) in flight", line).group(1)) for line in lines]
    assert counts and min(counts) >= 3, lines
    stats = [json.loads(p.read_text()) for p in sorted((out / "embeddings" / "stats").glob("stats_*.json"))]
    assert all(s["seconds"]["decode_task_cpu"] < 0.5 * s["seconds"]["decode_task"] for s in stats)
    spans = sorted((s["started"], s["started"] + s["wall_seconds"]) for s in stats)
    at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert at_once >= 3, spans


# ---------------------------------------------------------------------------------------------------------
# the output's own faults: a path that cannot be written, a full disk


@pytest.mark.slow
def test_an_unwritable_output_fails_naming_the_path_and_resumes_once_fixed(clean_run, generated, tmp_path):
    """The scan's ``matches/`` is a file (as root, permission bits stop nothing; a path through a file does):
    every chunk fails naming the path it could not write, no chunk is marked done, and once the path is
    fixed a rerun resumes to the clean run's matches."""
    clean_url, _, clean_summary, clean_matches = clean_run
    out = tmp_path / "scan"
    out.mkdir()
    shutil.copy(Path(clean_url).parent / "scan" / layout.RUN_CONFIG_NAME, out)  # a run of the same settings
    (out / "matches").write_text("not a folder")
    with pytest.raises(CopyscanError) as error:
        _scan(clean_url, str(generated[0]), str(out), chunk_size=4, retries=0)
    want = f"cannot write {out}/matches/part-00000.parquet: a parent of the path is not a folder"
    assert want in str(error.value)
    assert not (out / "chunks").exists() or list((out / "chunks").iterdir()) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks"] == 0 and len(summary["failed_chunks"]) == summary["chunks_total"]
    (out / "matches").unlink()
    summary = _scan(clean_url, str(generated[0]), str(out), chunk_size=4)
    assert (summary["queries"], summary["matches"]) == (clean_summary["queries"], clean_summary["matches"])
    _assert_same_matches(_matches(str(out)), clean_matches)


@pytest.mark.slow
def test_a_full_disk_fails_the_report_naming_the_file(clean_run, tmp_path):
    """``copyscan report`` with a disk that fills after 16 kB (the file size limit of its process, SIGXFSZ
    ignored: the same EFBIG/ENOSPC path in copyscan, and it works as root): exit status 2, an error naming
    the file, no report.html."""
    run = str(Path(clean_run[0]).parent / "scan")
    out = tmp_path / "report"

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "copyscan.jobs.report", run, f"out={out}"],
        env=env,
        cwd=REPO,
        preexec_fn=full_disk,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"cannot write {out}/" in done.stderr and "file too large" in done.stderr, done.stderr[-3000:]
    assert not (out / layout.REPORT_HTML_NAME).exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
