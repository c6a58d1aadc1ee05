"""``run_stage``: finished items are skipped, the rest run, and every item that still failed is named in one
error (the runner here stands in for ``run_pool`` / ``run_tasks``: it fails the items it is told to)."""

from __future__ import annotations

import logging

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.pool_ray import PoolOutcome
from copyscan.indexing.runtime.resumable import Stage, failure_message, run_stage

SHARDS = Stage("embed", "shard", "images", source=str)
FILL = Stage("fill", "index shard", "vectors", count_field="ntotal")


class FakeRunner:
    """Runs each item by calling ``on_result`` with a marker, except the ids in ``fail``."""

    def __init__(self, fail=(), field="count"):
        self.fail, self.field, self.calls = set(fail), field, []

    def __call__(self, items, *, retries, on_result, describe):
        self.calls.append(([item[0] for item in items], retries, [describe(item) for item in items]))
        outcome = PoolOutcome()
        for item in items:
            if item[0] in self.fail:
                outcome.failed.append((item, f"OSError: {item[1]} is gone"))
            else:
                marker = {self.field: 10 * item[0], "id": item[0]}
                outcome.results.append((item, marker))
                on_result(item, marker)
        return outcome


def test_done_items_are_skipped_and_kept(caplog):
    items = [(i, f"s3://b/{i:05d}.tar") for i in range(5)]
    done = {1: {"count": 7, "id": 1}, 3: {"count": 9, "id": 3}}
    runner, reported = FakeRunner(), []
    with caplog.at_level(logging.INFO, logger="copyscan"):
        markers = run_stage(SHARDS, items, done, runner, retries=2, report=lambda i, m: reported.append(i[0]))
    assert runner.calls == [
        (
            [0, 2, 4],
            2,
            [
                "shard 00000 (s3://b/00000.tar)",
                "shard 00002 (s3://b/00002.tar)",
                "shard 00004 (s3://b/00004.tar)",
            ],
        )
    ]
    assert sorted(markers) == [0, 1, 2, 3, 4] and markers[1] is done[1] and markers[4]["id"] == 4
    assert reported == [0, 2, 4]
    assert "embed: 2 of 5 shards already done, 3 to go" in caplog.text
    assert "embed: 3/3 shards, 60 images" in caplog.text  # the progress line counts each marker's "count"


def test_nothing_to_do_runs_nothing():
    runner = FakeRunner()
    done = {0: {"ntotal": 1}, 1: {"ntotal": 2}}
    assert run_stage(FILL, [(0, [0]), (1, [1, 2])], done, runner, retries=0) == done
    assert runner.calls == []


def test_every_failed_item_is_named_once_the_others_are_done():
    items = [(j, [j]) for j in range(4)]
    runner = FakeRunner(fail={1, 3}, field="ntotal")
    with pytest.raises(CopyscanError) as err:
        run_stage(FILL, items, {}, runner, retries=1)
    assert str(err.value) == (
        "2 index shard(s) failed after 2 attempts; the other index shards are done and a rerun resumes from "
        "here:\n  index shard 00001: OSError: [1] is gone\n  index shard 00003: OSError: [3] is gone"
    )
    assert runner.calls[0][0] == [0, 1, 2, 3]  # the failures did not stop the other items


def test_failure_message_names_the_source():
    failed = [((7, "s3://b/00007.tar"), "RayTaskError: boom")]
    assert failure_message(SHARDS, failed, retries=2) == (
        "1 shard(s) failed after 3 attempts; the other shards are done and a rerun resumes from here:\n"
        "  shard 00007 (s3://b/00007.tar): RayTaskError: boom"
    )
