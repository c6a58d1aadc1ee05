"""How many shards an embedding actor keeps in flight, from the rates the run measures (no Ray here).

Each shard in flight has one CPU decode task feeding its batches to the actor (``decode_ray.py``), so the
shards in flight are the actor's decode streams. A CPU actor's model is slower than a decode task (on the
2-core VM 2 / 108 core-seconds an image against 1 / 568), so two streams keep it busy. A GPU's model is ~40×
faster than one decode task (README "Throughput": 5,600 images/s on an H200 against 150 per decode core), and
two streams would leave it idle 95 % of the time. ``DecodeFanout`` computes the streams an actor needs from
the two measured costs:

    streams = ceil(HEADROOM × decode task seconds per image / model seconds per image)

bounded below by ``MIN_IN_FLIGHT`` and above by the CPUs the decode tasks can have: a decode task is one
thread, on a core (or waiting for one) for its measured share of its time (1 where it decodes, less where
it waits on storage), so the cluster's free cores run cores / share of them at once, and more add memory,
not speed. (A task slowed by cores that the model keeps busy counts its wait for a core as needing one, so
it is not taken for a task waiting on storage.)

The decode cost is each shard's ``decode_task`` seconds (the task's own work, ``DecodedBatch.decode_seconds``)
and its share ``decode_task_cpu`` / ``decode_task``; the model's is the actor's ``ModelClock``: seconds
during which any of its calls was in the model, so that calls sharing one GPU are not counted twice. Both
are re-read as shards finish, and the pool (``pool_ray.run_pool``'s ``per_actor``) follows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

logger = logging.getLogger("copyscan")

# Streams per actor before anything is measured, and at least: decoding the next shard overlaps the model
MIN_IN_FLIGHT = 2
# ... and at most (an actor's ``max_concurrency`` when the count follows the rates)
MAX_IN_FLIGHT = 64
# Decode rates vary between shards (image sizes, formats): this many streams more than the mean rates need
HEADROOM = 1.25
# How often the CPUs' room is read again (a few calls to the cluster's control store, as pools resize)
ROOM_S = 2.0
# A decode task's CPU share is taken as at least this (a task that mostly waits still needs its core then)
MIN_CPU_SHARE = 0.1


class EmbedCalls:
    """An embedder whose ``embed*`` calls each run inside ``around()`` (a context manager), the rest of it as
    it is: the base of ``ModelClock`` and of the actors' ``OneBatchAtATime``."""

    def __init__(self, embedder: Any) -> None:
        self._embedder = embedder
        self._lock = threading.Lock()

    def around(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._embedder, name)
        if not (name.startswith("embed") and callable(attr)):
            return attr

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.around():
                return attr(*args, **kwargs)

        return wrapped


class ModelClock(EmbedCalls):
    """An embedder whose ``embed*`` calls are timed together, the rest of it as it is.

    ``busy_seconds()`` is the time during which at least one call was running: the model's own time, not
    counted twice where calls overlap (a GPU runs their kernels one after another), and not counting the
    calls' waits for decoded batches, which happen outside the model."""

    def __init__(self, embedder: Any) -> None:
        super().__init__(embedder)
        self._running = 0
        self._since = 0.0
        self._busy = 0.0
        self._images = 0

    @contextmanager
    def around(self) -> Iterator[None]:
        with self._lock:
            if self._running == 0:
                self._since = time.perf_counter()
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._busy += time.perf_counter() - self._since

    def busy_seconds(self) -> float:
        with self._lock:
            return self._busy + (time.perf_counter() - self._since if self._running else 0.0)

    def count(self, images: int) -> None:
        """``images`` more went through the model (a finished call's)."""
        with self._lock:
            self._images += images

    def totals(self) -> dict[str, Any]:
        """The images counted so far and the model's seconds: its cost an image, for ``DecodeFanout``."""
        return {"images": self._images, "seconds": round(self.busy_seconds(), 3)}


def streams_needed(decode_seconds_per_image: float, model_seconds_per_image: float) -> int:
    """Decode streams that keep a model of ``model_seconds_per_image`` busy, each stream making an image
    every ``decode_seconds_per_image`` (``HEADROOM`` more than the mean rates need), at least
    ``MIN_IN_FLIGHT``."""
    if decode_seconds_per_image <= 0 or model_seconds_per_image <= 0:
        return MIN_IN_FLIGHT
    return max(MIN_IN_FLIGHT, math.ceil(HEADROOM * decode_seconds_per_image / model_seconds_per_image))


class DecodeFanout:
    """Shards in flight per embedding actor: ``fixed`` when the user set it, else from the measured rates
    (module doc), within ``room(share)`` (the decode tasks, each busy ``share`` of its time, that the
    cluster's CPUs run at once per actor now).

    ``observe(stats)`` takes each finished shard's stats marker; calling the object gives the count now."""

    def __init__(
        self, fixed: int, room: Callable[[float], int], what: str = "embed", unit: str = "shard"
    ) -> None:
        self.fixed, self.room, self.what, self.unit = fixed, room, what, unit
        self.images = 0
        self.decode_seconds = self.decode_cpu_seconds = 0.0
        self.actors: dict[str, tuple[int, float]] = {}  # worker -> (images, model seconds) so far
        self.logged: tuple[int, int] | None = None
        self._room, self._room_at = MIN_IN_FLIGHT, -ROOM_S

    def observe(self, stats: dict[str, Any]) -> None:
        """A shard's stats marker (``write_shard_outputs``, with the actor's ``ModelClock.totals``)."""
        seconds = stats.get("seconds") or {}
        self.add(
            int(stats.get("count") or 0),
            float(seconds.get("decode_task") or 0.0),
            float(seconds.get("decode_task_cpu") or 0.0),
            stats.get("actor_model"),
        )

    def add(
        self,
        images: int,
        decode_seconds: float,
        decode_cpu_seconds: float,
        actor_model: dict[str, Any] | None,
    ) -> None:
        """One finished call: its images, its decode task's seconds and CPU seconds, and its actor's
        ``ModelClock.totals`` (with the actor's ``worker`` name); a call without them (every image rejected,
        a marker written before they were recorded) changes nothing."""
        if images and decode_seconds > 0:
            self.images += images
            self.decode_seconds += decode_seconds
            self.decode_cpu_seconds += decode_cpu_seconds
        if actor_model and actor_model.get("images"):
            worker = str(actor_model.get("worker"))
            self.actors[worker] = (int(actor_model["images"]), float(actor_model["seconds"]))

    def reporting(self, then: Callable[[Any, dict[str, Any]], None]) -> Callable[[Any, dict[str, Any]], None]:
        """A stage's ``report`` (``resumable.run_stage``): ``observe`` each shard's stats, then ``then``."""

        def report(item: Any, stats: dict[str, Any]) -> None:
            self.observe(stats)
            then(item, stats)

        return report

    def cpu_share(self) -> float:
        """The share of a decode task's time on a core (1 before any is measured)."""
        if not self.decode_seconds:
            return 1.0
        return min(1.0, max(MIN_CPU_SHARE, self.decode_cpu_seconds / self.decode_seconds))

    def rates(self) -> tuple[float, float] | None:
        """(decode task seconds per image, model seconds per image), or None before both are measured."""
        images = sum(n for n, _ in self.actors.values())
        if not self.images or not images:
            return None
        return self.decode_seconds / self.images, sum(s for _, s in self.actors.values()) / images

    def __call__(self) -> int:
        if self.fixed > 0:
            return self.fixed
        rates = self.rates()
        wanted = MIN_IN_FLIGHT if rates is None else streams_needed(*rates)
        if time.monotonic() - self._room_at >= ROOM_S:
            room = self.room(self.cpu_share())
            self._room, self._room_at = max(MIN_IN_FLIGHT, min(MAX_IN_FLIGHT, room)), time.monotonic()
        room = self._room
        count = min(wanted, room)
        if rates is not None and self._news(wanted, count):
            logger.info(
                "%s: a decode task takes %.2f ms an image and the model %.2f ms: %d %s(s) in flight per "
                "actor%s",
                self.what,
                1e3 * rates[0],
                1e3 * rates[1],
                count,
                self.unit,
                ""
                if count == wanted
                else f" ({wanted} wanted; the CPUs allow {count} of tasks on a core {self.cpu_share():.0%} of "
                "their time: decoding is the limit, add CPUs)",
            )
        return count

    def _news(self, wanted: int, count: int) -> bool:
        """Whether the count is worth a log line: the first measured one, or one a fifth off the last logged
        (the rates move a little with every shard)."""
        if self.logged is not None and all(
            abs(a - b) <= 0.2 * b for a, b in zip((wanted, count), self.logged, strict=True)
        ):
            return False
        self.logged = (wanted, count)
        return True
