"""CPU seconds of a process tree, read from /proc (Linux), in all and by kind of process.

A Ray job's work runs in processes the driver's Ray started (raylet, GCS, workers), so a job's CPU use is
its driver's and its descendants'. Ray names a worker after what it runs now (``ray::EmbedWorker.embed_shard``,
``ray::_decode_source``, ``ray::IDLE``), and a worker runs different things over a job, so every reading's
CPU seconds since the last go to the name the process has at that reading.
"""

from __future__ import annotations

import os
import threading


def process_kind(pid: int, root: int) -> str:
    """What a process of the tree is: "driver" (``root``), a Ray worker's task or actor class
    (``ray::EmbedWorker.embed_shard`` → "EmbedWorker", ``ray::IDLE`` → "IDLE"), or "ray" (Ray's own
    processes: raylet, GCS, dashboard, log monitor, ...)."""
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return "ray"
    if argv0.startswith("ray::"):
        return argv0[len("ray::") :].split(" ", 1)[0].split(".", 1)[0] or "ray"
    return "ray"


class CpuSampler:
    """CPU seconds used by a process and all its descendants from now on (read from /proc every
    ``interval`` s, so processes that end between two reads lose at most their last interval), in all
    (``stop``) and by kind of process (``by_kind``, after ``stop``)."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root, self.interval = root, interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.last = {pid: t for pid, (t, _) in self._read().items()}
        self.kinds: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _read(self) -> dict[int, tuple[float, str]]:
        parents, times = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            times[int(entry)] = (int(fields[11]) + int(fields[12])) / self.tick
        mine = {self.root}
        grew = True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in mine and pid not in mine:
                    mine.add(pid)
                    grew = True
        return {pid: (times[pid], process_kind(pid, self.root)) for pid in mine if pid in times}

    def _update(self) -> None:
        for pid, (t, kind) in self._read().items():
            self.kinds[kind] = self.kinds.get(kind, 0.0) + t - self.last.get(pid, 0.0)
            self.last[pid] = t

    def _poll(self) -> None:
        while not self.stopped.wait(self.interval):
            self._update()

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        self._update()
        return sum(self.kinds.values())

    def by_kind(self) -> dict[str, float]:
        """CPU seconds by kind of process (``process_kind``), largest first."""
        return {k: round(v, 2) for k, v in sorted(self.kinds.items(), key=lambda kv: -kv[1]) if v >= 0.005}
