"""Concurrent stages in the driver: calls that mostly wait on remote work, run side by side in threads.

A scan's driver hands each embedded query chunk to its search → regions → write steps. Those steps spend
their time waiting on Ray actors (the scan actors' searches, the crop embeddings) and on storage (the
chunk's files). Run one after the other in the loop that feeds the embedding actors, one chunk's wait held
up every other chunk and the feeding too; ``Stages`` runs them in a bounded number of threads instead, so
the searches of several chunks, the crop embedding of one and the write of another overlap, and the loop
goes back to scheduling at once. Ray's API is thread-safe; what the calls share (progress, failure lists,
the verification task stream) is guarded by ``lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger("copyscan")


MAX_THREADS = 64  # stage threads at most, however large the pool grows


class Stages:
    """Runs ``submit``-ted calls in stage threads, at most ``limit()`` at once (a number, or a function re-read
    at each ``submit``: a scan's pool of embedding actors grows as nodes join); ``submit`` waits while that
    many calls are unfinished (back-pressure: the caller stops feeding work while the stages are the
    bottleneck).

    A call that raises stops the stages: the next ``submit`` or ``finish`` raises its exception (calls are
    expected to catch and record the errors they can recover from). ``lock`` (re-entrant) guards what the
    calls share."""

    def __init__(self, limit: int | Callable[[], int], name: str = "stage") -> None:
        self.limit = limit if callable(limit) else (lambda: limit)
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self._executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix=name)
        self._error: BaseException | None = None
        self._busy = 0
        self.peak = 0  # calls that ran at once, at most

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a stage thread once fewer than ``limit()`` calls are unfinished."""
        with self._changed:
            while self._error is None and self._busy >= max(1, min(MAX_THREADS, self.limit())):
                self._changed.wait()
            self._raise_error()
            self._busy += 1
            self.peak = max(self.peak, self._busy)
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._done)

    def locked(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` called under ``lock`` (state the stage threads share)."""

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return fn(*args, **kwargs)

        return call

    def finish(self) -> None:
        """Wait for every call; raise the first error of one."""
        self._executor.shutdown(wait=True)
        self._raise_error()

    def close(self) -> None:
        """Stop taking calls; calls not started yet are dropped, running ones end on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _done(self, future: Future) -> None:
        error = None if future.cancelled() else future.exception()
        with self._changed:
            if error is not None and self._error is None:
                self._error = error
                logger.error("a stage failed: %r", error)
        self._release()

    def _release(self) -> None:
        with self._changed:
            self._busy -= 1
            self._changed.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
