"""Credentials never reach what copyscan writes or logs.

Distinctive secrets are set where users put them, in ``storage_options`` (``key``, ``secret`` and a nested
``client_kwargs.aws_session_token``) and in the AWS environment that jobs forward to Ray workers. Then
``copyscan index``, ``copyscan scan`` and ``copyscan report`` run on the loopback S3 server, the index as its
own driver process attached to the session's Ray (so its environment goes through ``init_ray``'s
``runtime_env`` to fresh workers), the scan and the report in this process. Every object in the bucket, every
local file and every log line (the index driver's stdout and stderr, this process's log records and file
descriptors) is searched for each secret.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from copyscan.indexing.store import storage
from copyscan.jobs.cli import main as copyscan

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "envSecret-7f3kQz9Lw2",
    "AWS_SESSION_TOKEN": "envToken-Hq5Xc81pVn",
    "key": "soKeyId-Ub4mR6tYe0",
    "secret": "soSecret-Jn2wK8aZs3",
    "aws_session_token": "soToken-Pd9gV1cLx7",
}


def _storage_options(endpoint: str) -> dict:
    return {
        "endpoint_url": endpoint,
        "key": SECRETS["key"],
        "secret": SECRETS["secret"],
        "client_kwargs": {"aws_session_token": SECRETS["aws_session_token"]},
    }


def _overrides(options: dict) -> list[str]:
    """``options`` as key=value overrides, the way a user passes them on the command line."""
    return [f"storage_options={json.dumps(options)}"]


def _leaks(name: str, data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    return [f"{name}: {label}" for label, value in SECRETS.items() if value in text]


def test_no_secret_in_outputs_or_logs(
    ray_session, s3_server, laion_shards_s3, generated, tmp_path, monkeypatch, caplog, capfd
):
    import ray

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRETS["AWS_SESSION_TOKEN"])
    caplog.set_level(logging.DEBUG, logger="copyscan")
    caplog.set_level(logging.INFO)
    folder, _ = generated
    bucket = s3_server.make_bucket("secrets")
    so = _storage_options(s3_server.endpoint_url)
    for f in sorted(folder.glob("*.jpg")):
        storage.upload_file(str(f), f"s3://{bucket}/generated/{f.name}", s3_server.storage_options)
    index_url, run_url = f"s3://{bucket}/idx", f"s3://{bucket}/scan"

    # the index job as its own driver: the forwarded environment and the real CLI's logging
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    args = ["--shards", laion_shards_s3.pattern, "--out", index_url, "-v", "max_shard_vectors=20"]
    index_job = subprocess.run(
        [sys.executable, "-m", "copyscan.jobs.index", *args, *_overrides(so)],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    assert index_job.returncode == 0, index_job.stderr.decode(errors="replace")[-3000:]

    local_report = tmp_path / "report"
    scan_args = ["--index", index_url, "--queries", f"s3://{bucket}/generated", "--out", run_url]
    assert copyscan(["scan", *scan_args, *_overrides(so)]) == 0
    report_args = [run_url, f"out={local_report}", "thumbnails=0", "train_sample=20", "resamples=50"]
    assert copyscan(["report", *report_args, *_overrides(so)]) == 0

    fs, _ = storage.get_fs(f"s3://{bucket}", s3_server.storage_options)
    written = sorted(fs.find(bucket))
    assert any(p.endswith("idx/manifest.json") for p in written)
    assert any(p.endswith("scan/run.yaml") for p in written)
    assert (local_report / "report.html").exists()
    leaks = []
    for path in written:
        leaks += _leaks(f"s3://{path}", fs.cat_file(path))
    for path in sorted(p for p in local_report.rglob("*") if p.is_file()):
        leaks += _leaks(str(path), path.read_bytes())
    leaks += _leaks("index job stdout", index_job.stdout)
    leaks += _leaks("index job stderr", index_job.stderr)
    out, err = capfd.readouterr()
    leaks += _leaks("stdout", out.encode())
    leaks += _leaks("stderr", err.encode())
    leaks += _leaks("log records", "\n".join(r.getMessage() for r in caplog.records).encode())
    assert not leaks, "secrets written or logged:\n" + "\n".join(leaks)
