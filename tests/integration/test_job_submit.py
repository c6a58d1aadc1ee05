"""`ray job submit` on a real Ray head: the index and scan entrypoints run as a Ray job and find the cluster.

A head is started with `ray start --head` (services and dashboard on 127.0.0.1, its own ports and temp dir,
so it never touches the session's Ray), an index + scan job is submitted through the Jobs API with the
project as working dir and ``infra/runtime_env.yaml``, and its outputs are checked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head (2 CPUs, dashboard + job server) in its own process group; yields the dashboard URL."""
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Every per-node service on its own free port: the session's Ray (another cluster on this host) holds the
    # default ones (e.g. the dashboard agent's 52365), and a head whose agent cannot bind accepts no jobs.
    node_ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
            "ray-client-server-port",
        )
    ]
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",  # the job's `python` is this environment's
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            os.path.join(bin_dir, "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *node_ports,
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {head.stderr.read()[-2000:]!r}") from None
                time.sleep(0.5)
        yield url
    finally:
        head.terminate()  # ray start --block drains and stops the node's processes on SIGTERM ...
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:  # ... and whatever is left of its process group goes now
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)


def test_index_and_scan_as_a_ray_job(ray_head, laion_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from jobs.demo.data import make_generated_images

    queries = tmp_path / "generated"
    truth = make_generated_images(
        laion_shards.source_images[:8], [], str(queries), n_copies=4, n_unrelated=0, seed=5
    )
    index_out, scan_out = tmp_path / "index", tmp_path / "scan"
    runtime_env = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    client = JobSubmissionClient(ray_head)
    entrypoint = (
        f"python -m jobs.index --shards {laion_shards.folder} --out {index_out} && "
        f"python -m jobs.scan --index {index_out} --queries {queries} --out {scan_out}"
    )
    deadline = time.time() + 120
    while True:  # the dashboard answers before the node's job agent has registered with it
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)
    deadline = time.time() + 480
    while (status := client.get_job_status(job)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        assert time.time() < deadline, f"job still {status} after 8 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    # the job attached to this cluster (no private Ray) and logged progress with a rate and an ETA
    assert "ETA" in logs and "images/s" in logs and "queries/s" in logs
    manifest = yaml.safe_load((index_out / "manifest.json").read_text())
    assert manifest["ntotal"] == len(laion_shards.key_of_source)
    table = pq.read_table(scan_out / "matches")
    assert set(table.column("query_id").to_pylist()) == {t["file"] for t in truth}
