"""Run work items over a pool of Ray actors with bounded in-flight calls, retries and actor replacement.

``ray.util.ActorPool`` allows one call per actor and gives up on the first error; copyscan needs a few
calls in flight per actor (so CPU decode of the next shard overlaps the model on this one), retries of
failed items on another actor, a fresh actor when one dies, and a list of the items that still failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from copyscan.indexing.errors import CopyscanError

logger = logging.getLogger("copyscan")

T = TypeVar("T")


@dataclass
class PoolOutcome(Generic[T]):
    results: list[tuple[T, Any]] = field(default_factory=list)
    failed: list[tuple[T, str]] = field(default_factory=list)
    peak_actors: int = 0  # actors ready at once, at most (run_pool)


# A pool's size: a number, or a function giving the number wanted now (called again as the run goes, so a
# pool can grow as nodes join: copyscan.indexing.runtime.cluster_ray.PoolSize)
Size = int | Callable[[], int]
RESIZE_S = 2.0  # how often a pool re-reads its size, and how long it waits for news before doing so
START_FAILURES = 3  # actors failing to start (their constructor raised) before the pool gives up


def run_pool(
    make_actor: Callable[[], Any],
    size: Size,
    items: Sequence[T],
    submit: Callable[[Any, T], ray.ObjectRef],
    *,
    per_actor: Size = 2,
    retries: int = 2,
    on_result: Callable[[T, Any], None] | None = None,
    describe: Callable[[T], str] = str,
    with_actor: bool = False,
    keep_results: bool = True,
    start_timeout: float = 900.0,
    before_close: Callable[[], None] | None = None,
) -> PoolOutcome[T]:
    """Call ``submit(actor, item)`` for every item; return results and the items that failed for good.

    The pool starts ``size`` actors (at most one per item; a function is asked again every ``RESIZE_S``, and
    the pool grows to it while items wait) and gives items only to actors that have started: an actor the
    cluster cannot place yet waits, without work, for a node (its pending demand makes an autoscaler add
    one). With no actor started for ``start_timeout`` seconds, or ``START_FAILURES`` actors failing to
    start, it raises CopyscanError. ``per_actor``: calls in flight per actor, a number or a function asked
    before each round of submissions (``copyscan.indexing.embed.fanout.DecodeFanout`` follows the rates the
    run measures; the actors' ``max_concurrency`` must allow its largest answer). An item that raises is
    retried up to ``retries`` times (possibly on another actor). An actor that dies is replaced by ``make_actor()``; its in-flight items are retried.
    ``on_result`` runs in the driver as each result arrives (progress, bookkeeping); ``with_actor``: as
    ``on_result(item, result, actor)``, the actor that made the result, for a second call on it (its other
    calls in flight keep running). ``keep_results=False``: results are not kept in the outcome (a long run
    whose ``on_result`` consumes them holds only what is in flight). ``before_close`` runs once every item
    is done, before the actors are killed: work that ``on_result`` started and that still calls them.
    """
    outcome: PoolOutcome[T] = PoolOutcome()
    if not items:
        return outcome
    wanted = size if callable(size) else (lambda: size)
    in_flight = per_actor if callable(per_actor) else (lambda: per_actor)
    pool = _ActorPool(make_actor, lambda: max(1, min(wanted(), len(items))), items, submit, in_flight)
    try:
        pool.grow()
        while pool.pending or pool.in_flight:
            finished = pool.next_finished(start_timeout, describe)
            if finished is None:
                continue
            ref, index, slot = finished
            item = items[index]
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                logger.warning("actor for %s died (%s); replacing it", describe(item), type(exc).__name__)
                pool.replace_actor(slot)
                _retry_or_fail(index, item, exc, pool.attempts, retries, pool.pending, outcome, describe)
            except (RayTaskError, GetTimeoutError, Exception) as exc:  # noqa: B014 - all task errors are retried
                _retry_or_fail(index, item, exc, pool.attempts, retries, pool.pending, outcome, describe)
            else:
                if keep_results:
                    outcome.results.append((item, result))
                if on_result is not None:
                    if with_actor:
                        on_result(item, result, pool.actors[slot])
                    else:
                        on_result(item, result)
            pool.fill()
        if before_close is not None:
            before_close()
    finally:
        outcome.peak_actors = pool.peak
        pool.close()
    return outcome


class _ActorPool(Generic[T]):
    """``run_pool``'s actors, each with at most ``per_actor`` calls in flight once started, and the items
    waiting. Actors start asynchronously (``__ray_ready__``); the pool grows to ``wanted()`` while items wait."""

    def __init__(
        self,
        make_actor: Callable[[], Any],
        wanted: Callable[[], int],
        items: Sequence[T],
        submit: Callable[[Any, T], ray.ObjectRef],
        per_actor: Callable[[], int],
    ) -> None:
        self.make_actor, self.wanted, self.items, self.submit = make_actor, wanted, items, submit
        self.per_actor = per_actor
        self.actors: list[Any] = []
        self.ready: list[bool] = []
        self.load: list[int] = []
        self.starting: dict[ray.ObjectRef, int] = {}  # an actor's __ray_ready__ ref -> its slot
        self.pending = list(range(len(items)))[::-1]  # a stack; pop() takes items in order
        self.attempts = [0] * len(items)
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (item index, actor slot)
        self.start_failures = 0
        self.peak = 0
        self.resized = self.progressed = time.monotonic()

    def grow(self) -> None:
        """Start actors up to ``wanted()`` while items wait (the tail of a run starts none)."""
        self.resized = time.monotonic()
        target = self.wanted()
        while len(self.actors) < target and self.pending:
            self.actors.append(None)
            self.ready.append(False)
            self.load.append(0)
            self._start(len(self.actors) - 1)

    def _start(self, slot: int) -> None:
        self.actors[slot] = actor = self.make_actor()
        self.ready[slot] = False
        self.starting[actor.__ray_ready__.remote()] = slot

    def fill(self) -> None:
        """Submit waiting items until every started actor has ``per_actor()`` calls in flight or none wait."""
        limit = max(1, self.per_actor())
        for slot in range(len(self.actors)):
            while self.ready[slot] and self.load[slot] < limit and self.pending:
                index = self.pending.pop()
                self.attempts[index] += 1
                ref = self.submit(self.actors[slot], self.items[index])
                self.in_flight[ref] = (index, slot)
                self.load[slot] += 1

    def next_finished(
        self, start_timeout: float, describe: Callable[[T], str]
    ) -> tuple[ray.ObjectRef, int, int] | None:
        """(a finished call's ref, its item index, its actor slot); None when instead an actor started, or
        nothing happened for ``RESIZE_S`` (the pool was resized meanwhile)."""
        waiting = [*self.in_flight, *self.starting]
        ready = ray.wait(waiting, num_returns=1, timeout=RESIZE_S)[0] if waiting else []
        if time.monotonic() - self.resized >= RESIZE_S:
            self.grow()
        if not ready:
            self._check_started(start_timeout, describe)
            return None
        self.progressed = time.monotonic()
        if ready[0] in self.starting:
            self._started(ready[0])
            return None
        index, slot = self.in_flight.pop(ready[0])
        self.load[slot] -= 1
        return ready[0], index, slot

    def _started(self, ref: ray.ObjectRef) -> None:
        slot = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as exc:  # its constructor raised, or its node went away before it started
            self.start_failures += bool(getattr(exc, "actor_init_failed", False))
            if self.start_failures >= START_FAILURES:
                raise CopyscanError(
                    f"{self.start_failures} actors failed to start; the last: {_short_error(exc)}"
                ) from exc
            logger.warning("an actor failed to start (%s); starting another", _short_error(exc))
            self._start(slot)
            return
        self.ready[slot] = True
        self.peak = max(self.peak, sum(self.ready))
        self.fill()

    def _check_started(self, start_timeout: float, describe: Callable[[T], str]) -> None:
        if any(self.ready) or not self.pending or time.monotonic() - self.progressed < start_timeout:
            return
        raise CopyscanError(
            f"no actor could start in {start_timeout:.0f} s, so {len(self.pending)} item(s) (first: "
            f"{describe(self.items[self.pending[-1]])}) could not run: the cluster has no node that fits one "
            "and its autoscaler (if any) started none. Check the job's resource keys (*_cpus, *_gpus) "
            "against the cluster's node types, or raise actor_start_timeout"
        )

    def replace_actor(self, slot: int) -> None:
        # Calls still queued on the dead actor will fail too; requeue them now instead of waiting for errors.
        for ref, (index, s) in list(self.in_flight.items()):
            if s == slot:
                self.in_flight.pop(ref)
                self.pending.append(index)
                self.load[slot] -= 1
        self._start(slot)

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)


def _retry_or_fail(index, item, exc, attempts, retries, pending, outcome, describe) -> None:
    message = _short_error(exc)
    if attempts[index] <= retries:
        logger.warning(
            "%s failed (attempt %d of %d): %s; retrying",
            describe(item),
            attempts[index],
            retries + 1,
            message,
        )
        pending.insert(0, index)  # retry after the items already queued
    else:
        logger.error("%s failed after %d attempts: %s", describe(item), attempts[index], message)
        outcome.failed.append((item, message))


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


class TaskStream(Generic[T]):
    """Stateless Ray tasks ``submit(item)`` fed as items arrive, at most ``max_in_flight`` at once.

    ``add`` submits an item, first waiting (and handling results) while ``max_in_flight`` tasks run (a number,
    or a function re-read every ``RESIZE_S``: the CPUs alive grow as an autoscaler adds nodes), so a
    producer that adds faster than the tasks finish is held back; ``poll`` handles finished tasks without
    waiting; ``finish`` waits for all. A task that raises is retried up to ``retries`` times; ``on_result``
    runs in the driver as each result arrives. An item is dropped once its task succeeds, and with
    ``keep_results=False`` its result too (a long stream whose results ``on_result`` consumes then holds
    only what is in flight and what failed).
    """

    def __init__(
        self,
        submit: Callable[[T], ray.ObjectRef],
        *,
        max_in_flight: Size,
        retries: int = 2,
        on_result: Callable[[T, Any], None] | None = None,
        describe: Callable[[T], str] = str,
        keep_results: bool = True,
    ) -> None:
        self.submit, self.retries = submit, retries
        self.size = max_in_flight if callable(max_in_flight) else (lambda: max_in_flight)
        self.max_in_flight, self.sized = max(1, self.size()), time.monotonic()
        self.on_result, self.describe, self.keep_results = on_result, describe, keep_results
        self.outcome: PoolOutcome[T] = PoolOutcome()
        self.items: dict[int, T] = {}  # added and not yet done
        self.attempts: dict[int, int] = {}
        self.pending: list[int] = []  # a stack of item numbers waiting for a slot (retries)
        self.in_flight: dict[ray.ObjectRef, int] = {}
        self.added = 0

    def add(self, item: T) -> None:
        self.items[self.added] = item
        self.attempts[self.added] = 0
        self.pending.append(self.added)
        self.added += 1
        self._fill()

    def poll(self) -> None:
        """Handle the tasks that have finished, without waiting."""
        while self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0)
            if not ready:
                return
            self._handle(ready[0])
        self._fill()

    def finish(self) -> PoolOutcome[T]:
        while self.pending or self.in_flight:
            self._fill()
            ready, _ = ray.wait(list(self.in_flight), num_returns=1)
            self._handle(ready[0])
        return self.outcome

    def _limit(self) -> int:
        """``max_in_flight`` now (re-read at most every ``RESIZE_S``)."""
        if time.monotonic() - self.sized >= RESIZE_S:
            self.max_in_flight, self.sized = max(1, self.size()), time.monotonic()
        return self.max_in_flight

    def _fill(self) -> None:
        while self.pending:
            while len(self.in_flight) >= self._limit():
                ready, _ = ray.wait(list(self.in_flight), num_returns=1)
                self._handle(ready[0])
            if not self.pending:  # a failure handled above may have been re-queued and taken already
                break
            index = self.pending.pop()
            self.attempts[index] += 1
            self.in_flight[self.submit(self.items[index])] = index

    def _handle(self, ref: ray.ObjectRef) -> None:
        index = self.in_flight.pop(ref)
        item = self.items[index]
        try:
            result = ray.get(ref)
        except Exception as exc:  # task errors, worker crashes: retried alike
            failed = len(self.outcome.failed)
            _retry_or_fail(
                index, item, exc, self.attempts, self.retries, self.pending, self.outcome, self.describe
            )
            if len(self.outcome.failed) > failed:
                self._forget(index)
        else:
            self._forget(index)
            if self.keep_results:
                self.outcome.results.append((item, result))
            if self.on_result is not None:
                self.on_result(item, result)

    def _forget(self, index: int) -> None:
        del self.items[index], self.attempts[index]


def run_tasks(
    submit: Callable[[T], ray.ObjectRef],
    items: Sequence[T],
    *,
    max_in_flight: Size,
    retries: int = 2,
    on_result: Callable[[T, Any], None] | None = None,
    describe: Callable[[T], str] = str,
) -> PoolOutcome[T]:
    """Run stateless Ray tasks ``submit(item)`` with at most ``max_in_flight`` at once, retrying failures."""
    stream = TaskStream(
        submit, max_in_flight=max_in_flight, retries=retries, on_result=on_result, describe=describe
    )
    for item in items:
        stream.add(item)
    return stream.finish()
