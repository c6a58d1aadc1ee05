"""Progress lines with rate and ETA for long jobs, and a small phase timer (autofaiss style)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("copyscan")


class Progress:
    """Counts finished units (shards, chunks) and items (images, queries); logs at most every ``every`` s.

    ``line()`` reads e.g. ``embed: 12/100 shards, 120,000 images, 2,310 images/s, ETA 0:05:10``.
    """

    def __init__(
        self, phase: str, total_units: int, unit: str = "shards", item: str = "images", every: float = 10.0
    ):
        self.phase = phase
        self.total_units = total_units
        self.unit = unit
        self.item = item
        self.every = every
        self.units = 0
        self.items = 0
        self.start = time.monotonic()
        self._last_log = 0.0

    def update(self, units: int = 1, items: int = 0, force: bool = False) -> None:
        self.units += units
        self.items += items
        now = time.monotonic()
        if force or self.units >= self.total_units or now - self._last_log >= self.every:
            self._last_log = now
            logger.info(self.line())

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.items / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        elapsed = time.monotonic() - self.start
        if self.units == 0 or elapsed <= 0:
            return None
        return elapsed / self.units * max(self.total_units - self.units, 0)

    def line(self) -> str:
        eta = self.eta_seconds()
        eta_text = "?" if eta is None else duration_text(eta)
        return (
            f"{self.phase}: {self.units}/{self.total_units} {self.unit}, {self.items:,} {self.item}, "
            f"{self.rate:,.1f} {self.item}/s, ETA {eta_text}"
        )


class WithinProgress:
    """Progress inside one long unit of work (a query chunk whose every image is cut into windows): called
    with the items each step finished, it emits at most every ``every`` seconds, and only once a step has
    taken that long, a line such as ``query chunk 00003: 448/1,024 queries, 0.21 queries/s, ETA 0:45:43``
    (``total`` None: no total, no ETA)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        emit: Callable[[str], None],
        item: str = "queries",
        every: float = 30.0,
    ) -> None:
        self.label, self.total, self.emit, self.item, self.every = label, total, emit, item, every
        self.done = 0
        self.start = self._last = time.monotonic()

    def __call__(self, items: int) -> None:
        self.done += items
        now = time.monotonic()
        if now - self._last < self.every or (self.total is not None and self.done >= self.total):
            return
        self._last = now
        rate = self.done / (now - self.start)
        of = "" if self.total is None else f"/{self.total:,}"
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {duration_text((self.total - self.done) / rate)}"
        self.emit(f"{self.label}: {self.done:,}{of} {self.item}, {rate:,.2f} {self.item}/s{eta}")


def duration_text(seconds: float) -> str:
    """``H:MM:SS`` for any number of seconds, days included as hours (``27:46:40``): never wraps at a day."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


@contextmanager
def timed(phase: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Log how long ``phase`` took and record it in ``timings``."""
    start = time.perf_counter()
    logger.info("%s: started", phase)
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        if timings is not None:
            timings[phase] = round(timings.get(phase, 0.0) + seconds, 3)
        logger.info("%s: %.1f s", phase, seconds)
