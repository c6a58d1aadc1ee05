"""What listens after a local start: copyscan's private Ray (no RAY_ADDRESS) and the demo's HTTP server
bind 127.0.0.1 only, every one of their listening TCP sockets (from /proc/net/tcp{,6})."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: starts a private local Ray the way every job does, runs one task, serves a
# folder the way the demo does, and prints [ip, port, process] of each socket listening in its process tree.
PROBE = r"""
import glob, json, os, socket, sys, tempfile
import ray  # imported first, as a user's code or a *_ray.py module may

def listening():
    out = {}
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(path).read().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            ip, port = f[1].split(":")
            raw = bytes.fromhex(ip)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(port, 16))
    return out

def tree(root):
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = int(open(stat).read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        seen.add(pid)
        todo += children.get(pid, [])
    return seen

def sockets():
    socks, found = listening(), []
    for pid in tree(os.getpid()):
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in socks:
                found.append([*socks[int(link[8:-1])], name])
    return found

os.environ.pop("RAY_ADDRESS", None)
from copyscan.jobs._runtime import init_ray
from copyscan.jobs.demo.data import serve_directory
init_ray(num_cpus=1)
import ray
assert ray.get(ray.remote(lambda: 1).remote()) == 1
with serve_directory(tempfile.mkdtemp()) as url:
    print(json.dumps({"url": url, "sockets": sockets()}))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_start_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    sockets = probe["sockets"]
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # Ray's own services were seen
    port = int(probe["url"].rsplit(":", 1)[1])
    assert any(p == port for _, p, _ in sockets), sockets  # and the demo's server
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _, _ in sockets), sockets
