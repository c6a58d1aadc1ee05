"""One writer per output: a lease file at ``OUT/_lease.json`` that a running index or scan job holds.

A job takes the lease before it touches its output and gives it back when it ends, however it ends. The
lease names its holder (job, host, pid, a random token) and when it last showed a sign of life
(``heartbeat_at``): a thread of the holder rewrites it every ``stale_after / 4`` seconds. A second job on
the same output is refused with an error naming the holder, unless the lease is stale:

- its holder ran on this machine and its process is gone (a killed run is resumed at once), or
- its heartbeat is older than ``stale_after`` seconds (``COPYSCAN_LEASE_TIMEOUT``, default 120): a run
  killed on another machine is resumed from anywhere after that wait. ``COPYSCAN_LEASE_TIMEOUT=0`` takes
  any lease over (a user who knows the holder is dead); so does deleting ``OUT/_lease.json``.

It works on object storage as on files, with whole-object writes only: the lease is written at its final
name and read back after ``SETTLE_SECONDS``; of two jobs that start together, the one whose write landed
last keeps it and the other is refused. (Stores without conditional writes allow no stricter protocol;
two writes further apart than the settle time are always seen.) The heartbeat compares the writer's and the
reader's clocks: they must agree to well within ``stale_after``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage
from copyscan.indexing.store.layout import LEASE_NAME

logger = logging.getLogger("copyscan")

TIMEOUT_ENV = "COPYSCAN_LEASE_TIMEOUT"
DEFAULT_STALE_AFTER = 120.0  # seconds without a heartbeat after which a lease is free
SETTLE_SECONDS = 0.5  # between writing the lease and reading it back (two jobs starting together)


def stale_after() -> float:
    """Seconds without a heartbeat after which a lease is free: ``$COPYSCAN_LEASE_TIMEOUT``, else 120."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_STALE_AFTER
    except ValueError:
        raise CopyscanError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise CopyscanError(f"{TIMEOUT_ENV}={raw!r} must be >= 0 seconds")
    return value


def machine_id() -> str:
    """This machine and pid namespace (host name, boot id, pid namespace): where a pid means a process."""
    parts = [socket.gethostname()]
    for path, read in (
        ("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()),
        ("/proc/self/ns/pid", os.readlink),
    ):
        try:
            parts.append(read(path))
        except OSError:
            pass
    return "/".join(parts)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None when there is no such process
    or no /proc: a pid reused by another process starts at another time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_gone(lease: dict[str, Any]) -> bool:
    """Whether the lease's holder ran here and its process no longer exists (or the pid is another's)."""
    if lease.get("machine") != machine_id():
        return False
    pid = int(lease.get("pid", -1))
    start = _process_start(pid)
    if start is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            return False
        return False
    return lease.get("pid_start") is not None and start != lease["pid_start"]


def staleness(lease: dict[str, Any], timeout: float, now: float | None = None) -> str | None:
    """Why ``lease`` is free to take over (its process is gone, its heartbeat is too old), None if held."""
    if _process_gone(lease):
        return f"its process {lease.get('pid')} on this machine is gone"
    age = (time.time() if now is None else now) - float(lease.get("heartbeat_at", 0))
    if age > timeout:
        return f"its last heartbeat was {age:.0f} s ago (> {TIMEOUT_ENV}={timeout:g} s)"
    return None


def read_lease(out: str, storage_options: storage.StorageOptions | None = None) -> dict[str, Any] | None:
    """The lease on ``out``, None when there is none (or it cannot be parsed: a torn local write)."""
    url = storage.join(out, LEASE_NAME)
    try:
        return storage.read_json(url, storage_options)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


class Lease:
    """The lease a job holds on its output (``acquire``); ``release`` gives it back."""

    def __init__(self, out: str, job: str, storage_options: storage.StorageOptions | None, timeout: float):
        self.out, self.job, self.storage_options, self.timeout = out, job, storage_options, timeout
        self.url = storage.join(out, LEASE_NAME)
        self.record: dict[str, Any] = {
            "job": job,
            "token": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "machine": machine_id(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started_at": time.time(),
            "stale_after": timeout,
        }
        self.lost: str | None = None  # who took the lease over, if someone did
        # a local output folder the lease itself made: removed with the lease when the run wrote nothing
        self.made_folder = storage.is_local(out) and not os.path.exists(storage.local_path(out))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        """Write the lease with a heartbeat of now (again: after ``mode=overwrite`` removed the output)."""
        storage.write_json(self.url, {**self.record, "heartbeat_at": time.time()}, self.storage_options)

    def holds(self) -> bool:
        current = read_lease(self.out, self.storage_options)
        return current is not None and current.get("token") == self.record["token"]

    def _beat(self) -> None:
        interval = max(1.0, self.timeout / 4)
        while not self._stop.wait(interval):
            try:
                current = read_lease(self.out, self.storage_options)
                if current is not None and current.get("token") != self.record["token"]:
                    self.lost = describe(current)
                    logger.error("lease on %s taken over by %s; this run stops writing", self.out, self.lost)
                    return
                self.write()
            except Exception as exc:  # a missed heartbeat is retried; the lease goes stale only after many
                logger.warning("lease on %s: heartbeat failed (%s)", self.out, exc)

    def check(self) -> None:
        """Raise CopyscanError if another run took the lease over (before a job writes its last file)."""
        if self.lost is not None:
            raise CopyscanError(f"{self.out}: the lease was taken over by {self.lost}; this run stopped")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self.holds():
                storage.remove(self.url, self.storage_options)
                if self.made_folder:
                    os.rmdir(storage.local_path(self.out))  # only if empty: a refused run leaves nothing
        except OSError as exc:
            if not self.made_folder or exc.errno != errno.ENOTEMPTY:
                logger.warning("lease on %s not removed (%s); it goes stale by itself", self.out, exc)
        except Exception as exc:  # the job's own outcome matters more; a left lease goes stale
            logger.warning("lease on %s not removed (%s); it goes stale by itself", self.out, exc)


def describe(lease: dict[str, Any]) -> str:
    """``copyscan index (host h, pid 123), started 04:01:02 UTC, last heartbeat 3 s ago``."""
    started = time.strftime("%H:%M:%S UTC", time.gmtime(float(lease.get("started_at", 0))))
    age = time.time() - float(lease.get("heartbeat_at", 0))
    return (
        f"copyscan {lease.get('job')} (host {lease.get('host')}, pid {lease.get('pid')}), "
        f"started {started}, last heartbeat {age:.0f} s ago"
    )


def acquire(out: str, job: str, storage_options: storage.StorageOptions | None = None) -> Lease:
    """Take the lease on ``out`` for ``job`` ("index", "scan") and start its heartbeat; CopyscanError when
    another live run holds it."""
    timeout = stale_after()
    lease = Lease(out, job, storage_options, timeout)
    current = read_lease(out, storage_options)
    if current is not None:
        why = staleness(current, timeout)
        if why is None:
            raise _held(out, current, timeout)
        logger.warning("lease on %s: taking over from %s: %s", out, describe(current), why)
    lease.write()
    time.sleep(SETTLE_SECONDS)
    current = read_lease(out, storage_options)
    if current is None or current.get("token") != lease.record["token"]:
        raise _held(out, current or {}, timeout)
    lease._thread = threading.Thread(target=lease._beat, name=f"lease {out}", daemon=True)
    lease._thread.start()
    return lease


def _held(out: str, current: dict[str, Any], timeout: float) -> CopyscanError:
    return CopyscanError(
        f"{out} is being written by another run: {describe(current)}. Two runs on one output would mix "
        f"their files; wait for it to end. If that run is dead, its lease ({storage.join(out, LEASE_NAME)}) "
        f"is free once its process is gone (same machine) or {timeout:g} s after its last heartbeat "
        f"(${TIMEOUT_ENV}); to take it over now, delete that file or set {TIMEOUT_ENV}=0."
    )


@contextmanager
def hold_lease(out: str, job: str, storage_options: storage.StorageOptions | None = None) -> Iterator[Lease]:
    """The lease on ``out`` for the duration of the block (``acquire`` ... ``release``)."""
    lease = acquire(out, job, storage_options)
    try:
        yield lease
    finally:
        lease.release()
