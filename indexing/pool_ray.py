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
) -> PoolOutcome[T]:
    """Call ``submit(actor, item)`` for every item; return results and the items that failed for good.

    An item that raises is retried up to ``retries`` times (possibly on another actor). An actor that dies
    is replaced by ``make_actor()``; its in-flight items are retried. ``on_result`` runs in the driver as
    each result arrives (progress, bookkeeping).
    """
    outcome: PoolOutcome[T] = PoolOutcome()
    if not items:
        return outcome
    num_actors = max(1, min(num_actors, len(items)))
    actors = [make_actor() for _ in range(num_actors)]
    pending = list(range(len(items)))[::-1]  # a stack; pop() takes items in order
    attempts = [0] * len(items)
    in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (item index, actor slot)
    load = [0] * num_actors

    def fill() -> None:
        for slot in range(num_actors):
            while load[slot] < per_actor and pending:
                index = pending.pop()
                attempts[index] += 1
                ref = submit(actors[slot], items[index])
                in_flight[ref] = (index, slot)
                load[slot] += 1

    fill()
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        index, slot = in_flight.pop(ref)
        load[slot] -= 1
        item = items[index]
        try:
            result = ray.get(ref)
        except RayActorError as exc:
            logger.warning("actor for %s died (%s); replacing it", describe(item), type(exc).__name__)
            _replace_actor(actors, slot, make_actor, in_flight, load, pending)
            _retry_or_fail(index, item, exc, attempts, retries, pending, outcome, describe)
        except (RayTaskError, GetTimeoutError, Exception) as exc:  # noqa: B014 - all task errors are retried
            _retry_or_fail(index, item, exc, attempts, retries, pending, outcome, describe)
        else:
            outcome.results.append((item, result))
            if on_result is not None:
                on_result(item, result)
        fill()
    for actor in actors:
        ray.kill(actor, no_restart=True)
    return outcome


def _replace_actor(actors, slot, make_actor, in_flight, load, pending) -> None:
    # Calls still queued on the dead actor will fail too; requeue them now instead of waiting for errors.
    for ref, (index, s) in list(in_flight.items()):
        if s == slot:
            in_flight.pop(ref)
            pending.append(index)
            load[slot] -= 1
    actors[slot] = make_actor()


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
    outcome: PoolOutcome[T] = PoolOutcome()
    pending = list(range(len(items)))[::-1]
    attempts = [0] * len(items)
    in_flight: dict[ray.ObjectRef, int] = {}
    while pending or in_flight:
        while pending and len(in_flight) < max(1, max_in_flight):
            index = pending.pop()
            attempts[index] += 1
            in_flight[submit(items[index])] = index
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        index = in_flight.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # task errors, worker crashes: retried alike
            _retry_or_fail(index, items[index], exc, attempts, retries, pending, outcome, describe)
        else:
            outcome.results.append((items[index], result))
            if on_result is not None:
                on_result(items[index], result)
    return outcome
