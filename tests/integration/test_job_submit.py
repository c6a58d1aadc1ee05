"""`ray job submit` on a real Ray head: the index and scan entrypoints run as a Ray job and find the cluster.

A head is started with `ray start --head` (tests/integration/ray_heads.py: services and dashboard on 127.0.0.1,
its own ports and temp dir, so it never touches the session's Ray), an index + scan job is submitted through the Jobs API with the
project as working dir and ``infra/runtime_env.yaml``, and its outputs are checked.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """A Ray head (2 CPUs, dashboard + job server) in its own process group; yields the dashboard URL."""
    from ray_heads import ray_head as start_head

    with start_head(2, dashboard=True) as head:
        yield head.dashboard_url


def test_index_and_scan_as_a_ray_job(ray_head, laion_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from copyscan.jobs.demo.data import make_generated_images

    queries = tmp_path / "generated"
    truth = make_generated_images(
        laion_shards.source_images[:8], [], str(queries), n_copies=4, n_unrelated=0, seed=5
    )
    index_out, scan_out = tmp_path / "index", tmp_path / "scan"
    runtime_env = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    client = JobSubmissionClient(ray_head)
    entrypoint = (
        f"python -m copyscan.jobs.index --shards {laion_shards.folder} --out {index_out} && "
        f"python -m copyscan.jobs.scan --index {index_out} --queries {queries} --out {scan_out}"
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


def test_submit_passes_the_entrypoints_exit_status_on(ray_head):
    """``copyscan submit`` (what the nightly CronJob runs) exits with the job's own status: 3 (a regression)
    is not 1 (an error), as ``ray job submit`` would make both."""
    import subprocess
    import sys

    def submit(code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "copyscan.jobs.submit", "--address", ray_head, "--working-dir", str(REPO),
             "--runtime-env", str(REPO / "infra" / "runtime_env.yaml"), "--", "python", "-c", code],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    regression = submit("import sys; print('rate rose'); sys.exit(3)")
    assert regression.returncode == 3, regression.stderr[-3000:]
    assert "rate rose" in regression.stdout  # the job's log, streamed
    assert submit("print('fine')").returncode == 0
    assert submit("raise SystemExit('crashed')").returncode == 1
