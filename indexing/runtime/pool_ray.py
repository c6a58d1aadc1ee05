"""Run work items over a pool of Ray actors with bounded in-flight calls, retries and actor replacement.

``ray.util.ActorPool`` allows one call per actor and gives up on the first error; copyscan needs a few
calls in flight per actor (so CPU decode of the next shard overlaps the model on this one), retries of
failed items on another actor, a fresh actor when one dies, and a list of the items that still failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

logger = logging.getLogger("copyscan")

T = TypeVar("T")


@dataclass
class PoolOutcome(Generic[T]):
    results: list[tuple[T, Any]] = field(default_factory=list)
    failed: list[tuple[T, str]] = field(default_factory=list)


def run_pool(
    make_actor: Callable[[], Any],
    num_actors: int,
    items: Sequence[T],
    submit: Callable[[Any, T], ray.ObjectRef],
    *,
    per_actor: int = 2,
    retries: int = 2,
    on_result: Callable[[T, Any], None] | None = None,
    describe: Callable[[T], str] = str,
    with_actor: bool = False,
    keep_results: bool = True,
) -> PoolOutcome[T]:
    """Call ``submit(actor, item)`` for every item; return results and the items that failed for good.

    An item that raises is retried up to ``retries`` times (possibly on another actor). An actor that dies
    is replaced by ``make_actor()``; its in-flight items are retried. ``on_result`` runs in the driver as
    each result arrives (progress, bookkeeping); ``with_actor``: as ``on_result(item, result, actor)``, the
    actor that made the result, for a second call on it (its other calls in flight keep running).
    ``keep_results=False``: results are not kept in the outcome (a long run whose ``on_result`` consumes
    them holds only what is in flight).
    """
    outcome: PoolOutcome[T] = PoolOutcome()
    if not items:
        return outcome
    pool = _ActorPool(make_actor, max(1, min(num_actors, len(items))), items, submit, per_actor)
    pool.fill()
    while pool.in_flight:
        ref, index, slot = pool.wait_one()
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
    pool.close()
    return outcome


class _ActorPool(Generic[T]):
    """``run_pool``'s actors, each with at most ``per_actor`` calls in flight, and the items waiting."""

    def __init__(
        self,
        make_actor: Callable[[], Any],
        num_actors: int,
        items: Sequence[T],
        submit: Callable[[Any, T], ray.ObjectRef],
        per_actor: int,
    ) -> None:
        self.make_actor, self.items, self.submit, self.per_actor = make_actor, items, submit, per_actor
        self.actors = [make_actor() for _ in range(num_actors)]
        self.pending = list(range(len(items)))[::-1]  # a stack; pop() takes items in order
        self.attempts = [0] * len(items)
        self.in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (item index, actor slot)
        self.load = [0] * num_actors

    def fill(self) -> None:
        """Submit waiting items until every actor has ``per_actor`` calls in flight or none wait."""
        for slot in range(len(self.actors)):
            while self.load[slot] < self.per_actor and self.pending:
                index = self.pending.pop()
                self.attempts[index] += 1
                ref = self.submit(self.actors[slot], self.items[index])
                self.in_flight[ref] = (index, slot)
                self.load[slot] += 1

    def wait_one(self) -> tuple[ray.ObjectRef, int, int]:
        """(a finished call's ref, its item index, its actor slot), once one has finished."""
        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        index, slot = self.in_flight.pop(ready[0])
        self.load[slot] -= 1
        return ready[0], index, slot

    def replace_actor(self, slot: int) -> None:
        # Calls still queued on the dead actor will fail too; requeue them now instead of waiting for errors.
        for ref, (index, s) in list(self.in_flight.items()):
            if s == slot:
                self.in_flight.pop(ref)
                self.pending.append(index)
                self.load[slot] -= 1
        self.actors[slot] = self.make_actor()

    def close(self) -> None:
        for actor in self.actors:
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

    ``add`` submits an item, first waiting (and handling results) while ``max_in_flight`` tasks run, so a
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
        max_in_flight: int,
        retries: int = 2,
        on_result: Callable[[T, Any], None] | None = None,
        describe: Callable[[T], str] = str,
        keep_results: bool = True,
    ) -> None:
        self.submit, self.max_in_flight, self.retries = submit, max(1, max_in_flight), retries
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

    def _fill(self) -> None:
        while self.pending:
            while len(self.in_flight) >= self.max_in_flight:
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
    max_in_flight: int,
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
