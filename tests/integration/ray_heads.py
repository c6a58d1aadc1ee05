"""Ray heads of their own for the tests that need a real cluster beside the session's local Ray.

``ray_head(...)`` starts ``ray start --head --block`` in its own process group, with every service on
127.0.0.1 at free ports and its own temp dir, so it never touches the session's Ray (``ray stop`` would kill
every Ray on the host: never called). With ``autoscaling_config`` it is Ray's fake multi-node autoscaler
(``RAY_FAKE_CLUSTER=1``, provider ``fake_multinode``): worker nodes are real raylets on this machine that the
autoscaler starts and removes like cloud nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
# The per-node services' ports: each node of these clusters gets free ones (the session's Ray holds the defaults)
NODE_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str  # GCS address, for RAY_ADDRESS / ray.init
    dashboard_url: str | None  # the job server, when started with one
    temp_dir: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """The environment of a driver attaching to this head (``python -m copyscan.jobs.X``)."""
        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
        }

    def monitor_log(self) -> str:
        """What the autoscaler logged so far (``Adding 1 node(s) of type gpu``, ``Removing ...``)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)


def fake_autoscaling_config(gcs_address: str, worker_types: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A cluster config for Ray's fake multi-node provider: a head with no CPUs (nothing is scheduled on it) and
    ``worker_types`` ({name: {"resources": ..., "min_workers": ..., "max_workers": ...}}), nodes removed after
    6 idle seconds. (Ray's wheel lacks the example file ``ray.cluster_utils.AutoscalingCluster`` reads.)"""
    types = {name: {"node_config": {}, **spec} for name, spec in worker_types.items()}
    types["ray.head.default"] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    config: dict[str, Any] = {
        "cluster_name": "fake-multinode",
        "max_workers": sum(spec.get("max_workers", 0) for spec in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{
            key: []
            for key in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
        },
        **extra,
    }
    return config


@contextmanager
def ray_head(
    num_cpus: int, *, dashboard: bool = False, worker_types: dict[str, Any] | None = None
) -> Iterator[RayHead]:
    """A Ray head of ``num_cpus`` CPUs (with the dashboard and job server when ``dashboard``; with Ray's fake
    autoscaler over ``worker_types`` when given), ready to attach to; stopped with its whole process group."""
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{gcs_port}"
    # Every per-node service on its own free port: the session's Ray (another cluster on this host) holds the
    # default ones (e.g. the dashboard agent's 52365), and a head whose agent cannot bind accepts no jobs.
    node_ports = [f"--{name}={free_port()}" for name in (*NODE_PORT_FLAGS, "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**RayHead(address, None, temp_dir, None).env(), "AUTOSCALER_UPDATE_INTERVAL_S": "1"}  # type: ignore[arg-type]
    env.pop("RAY_ADDRESS")
    args = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *node_ports,
    ]
    if dashboard:
        args += [
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
        ]
    else:
        args.append("--include-dashboard=false")
    if worker_types is not None:
        config_path = Path(temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(fake_autoscaling_config(address, worker_types)))
        args.append(f"--autoscaling-config={config_path}")
        env["RAY_FAKE_CLUSTER"] = "1"
    process = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    head = RayHead(address, f"http://127.0.0.1:{dashboard_port}" if dashboard else None, temp_dir, process)
    try:
        _wait_started(head, env)
        yield head
    finally:
        _stop(process)


def wait_for_nodes(head: RayHead, count: int, timeout: float = 120) -> None:
    """Until ``ray status`` of ``head`` counts ``count`` active nodes (the head included)."""
    env = head.env()
    env.pop("RAY_ADDRESS")
    deadline = time.time() + timeout
    while True:
        status = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={head.address}"], env=env, capture_output=True, text=True
        ).stdout
        active = status.split("Active:", 1)[-1].split("Pending:", 1)[0]
        if sum(int(n) for n in re.findall(r"^\s*(\d+) \S+$", active, re.M)) >= count:
            return
        if time.time() > deadline:
            raise RuntimeError(f"{count} nodes did not come up on {head.address}: {status[-2000:]}")
        time.sleep(0.5)


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = (parent, cmdline)
    return found


def actor_processes(head: RayHead, actor_class: str) -> list[int]:
    """PIDs of this cluster's worker processes running an actor of ``actor_class`` (``ray::{class}...``)."""
    processes = _processes()

    def in_cluster(
        pid: int,
    ) -> bool:  # a descendant of the head's `ray start` (workers are in their own groups)
        while pid > 1 and pid in processes:
            if pid == head.process.pid:
                return True
            pid = processes[pid][0]
        return False

    return [
        pid
        for pid, (_, cmdline) in processes.items()
        if cmdline.startswith(f"ray::{actor_class}") and in_cluster(pid)
    ]


def kill_node_of(pid: int) -> None:
    """Lose the node running process ``pid``: SIGKILL to its raylet and everything the raylet started (its
    workers, agents, object store), as when the machine goes away. (Ray's fake provider does not notice: it
    starts no node in its place.)"""
    processes = _processes()
    raylet = processes[pid][0]
    assert "raylet" in processes[raylet][1], processes[raylet][1]
    family, grew = {raylet}, True
    while grew:  # the raylet's descendants
        children = {p for p, (parent, _) in processes.items() if parent in family} - family
        family |= children
        grew = bool(children)
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_started(head: RayHead, env: dict[str, str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        if head.dashboard_url is not None:
            try:
                with urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2):
                    return
            except OSError:
                pass
        elif (
            subprocess.run(
                [str(BIN / "ray"), "status", f"--address={head.address}"], env=env, capture_output=True
            ).returncode
            == 0
        ):
            return
        if head.process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray head did not start: {head.process.stderr.read()[-2000:]!r}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()  # ray start --block drains and stops the node's processes on SIGTERM ...
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:  # ... and whatever is left of its process group (fake worker nodes included) goes now
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
