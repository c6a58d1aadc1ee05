"""A wall-clock limit on a block of Python code, for work on hostile input that may never end (a decoder
looping on a crafted file).

The limit is a ``SIGALRM`` timer, so it holds in the main thread of a process (a Ray task's, the driver's),
where Python runs signal handlers: the block is interrupted between two bytecodes, i.e. at the latest when
the C call it is in returns (Pillow decodes a file in chunks, each a call). Elsewhere (a thread of an actor
with ``max_concurrency``), and on platforms without ``setitimer``, the block runs without a limit. A timer
already set by someone else (pytest-timeout) is suspended for the block, then set again for what is left.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class DeadlineExceeded(Exception):
    """Raised inside a ``time_limit`` block that ran past its limit."""


def _can_limit() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise DeadlineExceeded in the block once it has run ``seconds`` (None or <= 0: no limit)."""
    if not seconds or seconds <= 0 or not _can_limit():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise DeadlineExceeded(f"still running after {seconds:g} s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), previous_interval)
