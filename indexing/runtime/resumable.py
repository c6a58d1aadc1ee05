"""One resumable stage of a job: skip the items whose finished markers exist, run the rest, fail as one.

A stage's items are ``(id, payload)`` pairs (an embedding shard and its tar's URL, an index shard and its
group of embedding shards); ``done`` holds the markers an earlier run wrote, by id. ``run_stage`` logs
what is done and what is to go, runs the rest through a runner (``pool_ray.run_pool`` or ``run_tasks`` with
their other arguments bound) with a progress line, and raises one CopyscanError naming every item that
still failed after its retries, the others staying done for a rerun to resume from. No Ray here: the
runner is the Ray part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.progress import Progress

if TYPE_CHECKING:
    from copyscan.indexing.runtime.pool_ray import PoolOutcome

logger = logging.getLogger("copyscan")

P = TypeVar("P")  # an item's payload
Item = tuple[int, Any]  # (id, payload)
Marker = dict[str, Any]  # what a finished item wrote last (its stats), and what the runner returns for it


class Runner(Protocol):
    """``run_pool`` or ``run_tasks`` with everything but these arguments bound (``functools.partial``)."""

    def __call__(
        self,
        items: Sequence[Item],
        *,
        retries: int,
        on_result: Callable[[Item, Marker], None],
        describe: Callable[[Item], str],
    ) -> PoolOutcome[Item]: ...


@dataclass(frozen=True)
class Stage:
    """How a stage names itself: in its log and progress lines, retry warnings and error."""

    name: str  # log prefix and progress phase: "embed"
    noun: str  # one item: "shard", "part", "index shard"
    counted: str  # what a marker's ``count_field`` counts: "images", "vectors"
    count_field: str = "count"
    source: Callable[[Any], str] | None = None  # the payload as shown after the item's id, if at all

    @property
    def units(self) -> str:
        return f"{self.noun}s"

    def describe(self, item: Item) -> str:
        """``shard 00042 (s3://bucket/00042.tar)``, or ``index shard 00003`` without a ``source``."""
        text = f"{self.noun} {item[0]:05d}"
        return f"{text} ({self.source(item[1])})" if self.source is not None else text


def run_stage(
    stage: Stage,
    items: Sequence[Item],
    done: Mapping[int, Marker],
    run: Runner,
    *,
    retries: int,
    report: Callable[[Item, Marker], None] | None = None,
) -> dict[int, Marker]:
    """Run the items of ``items`` not in ``done``; return every item's marker by id (``done``'s included).

    ``report(item, marker)`` runs in the driver after each new marker (e.g. a log line about it). Raises
    CopyscanError listing each item that failed ``retries + 1`` times, once every other item has finished.
    """
    todo = [item for item in items if item[0] not in done]
    logger.info(
        "%s: %d of %d %s already done, %d to go", stage.name, len(done), len(items), stage.units, len(todo)
    )
    markers = dict(done)
    if not todo:
        return markers
    progress = Progress(stage.name, len(todo), unit=stage.units, item=stage.counted)

    def on_result(item: Item, marker: Marker) -> None:
        markers[item[0]] = marker
        progress.update(1, int(marker[stage.count_field]))
        if report is not None:
            report(item, marker)

    outcome = run(todo, retries=retries, on_result=on_result, describe=stage.describe)
    if outcome.failed:
        raise CopyscanError(failure_message(stage, outcome.failed, retries))
    return markers


def failure_message(stage: Stage, failed: Sequence[tuple[Item, str]], retries: int) -> str:
    """The error of a stage whose ``failed`` items (each with its last error) are still not done."""
    listing = "\n".join(f"  {stage.describe(item)}: {error}" for item, error in failed)
    return (
        f"{len(failed)} {stage.noun}(s) failed after {retries + 1} attempts; the other {stage.units} are done "
        f"and a rerun resumes from here:\n{listing}"
    )
