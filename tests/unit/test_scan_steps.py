"""A query chunk's path through the scan steps (search/scan_steps.py) without Ray: search → write, the
records a tar chunk's queries are written with, empty chunks, verified writes handed on, failures listed."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from copyscan.indexing.embed.stage import EmbeddedSource
from copyscan.indexing.store import layout
from copyscan.search.ann.topk import ShardResult
from copyscan.search.scan_chunks import QueryChunk
from copyscan.search.scan_steps import ChunkScan, SearchStep, WriteStep

K = 2
IMAGES = [int(layout.pack_ids(1, np.array([row]))[0]) for row in range(3)]
META = {
    i: {"train_key": f"train{n}", "train_url": f"u{n}", "caption": None, "index_shard": 0}
    for n, i in enumerate(IMAGES)
}


class FakeIndex:
    """Every query's top 2: images 0 and 1 at cosines 0.9 and 0.5; fails when ``fail`` is set."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail, self.searched = fail, []

    def search(self, xq, above=None):
        if self.fail is not None:
            raise self.fail
        self.searched.append(xq.shape)
        nq = len(xq)
        D = np.tile(np.array([[0.9, 0.5]], np.float32), (nq, 1))
        return ShardResult(D, np.tile(np.array([IMAGES[:2]], np.int64), (nq, 1)), D - 0.05, META)


class FakeNormaliser:
    def __call__(self, xq, D, I):
        return (D - 0.25).astype(np.float32)


def _scan(tmp_path, index, verified=None):
    written = []
    write = WriteStep(
        str(tmp_path), {}, {"column": "score_norm", "value": 0.5}, None, written.append, verified
    )
    steps = ChunkScan(SearchStep(index, FakeNormaliser(), K), None, write, "build-1", errors=(OSError,))
    return steps, written


def _embedded(n: int, rejected: int = 0) -> EmbeddedSource:
    records = [{"key": f"q{i}", "url": None, "width": 10, "height": 10} for i in range(n)]
    rejections = [{"key": f"bad{i}", "reason": "decode", "detail": ""} for i in range(rejected)]
    return EmbeddedSource(np.ones((n, 4), np.float32), records, rejections, embed_seconds=0.5)


def test_a_tar_chunk_is_searched_and_written_with_its_shard_as_source(tmp_path):
    index = FakeIndex()
    steps, written = _scan(tmp_path, index)
    chunk = QueryChunk(7, "tar", ("s3://bucket/queries-00007.tar",))
    steps(chunk, _embedded(3, rejected=1), embed_crops=None)
    assert steps.failed == [] and index.searched == [(3, 4)]
    marker = json.loads((tmp_path / "chunks" / "chunk_00007.json").read_text())
    assert written == [marker]
    assert marker["queries"] == 4 and marker["embedded"] == 3 and marker["rejected"] == 1
    assert marker["index_build_id"] == "build-1" and marker["source"] == chunk.describe()
    assert marker["radius"] is None and marker["flagged"] == 3  # 0.9 - 0.25 >= 0.5 at rank 0
    table = pq.read_table(tmp_path / "matches" / "part-00007.parquet").to_pylist()
    assert len(table) == 6 and {r["query_source"] for r in table} == {"s3://bucket/queries-00007.tar"}
    assert [r["score_norm"] for r in table[:2]] == pytest.approx([0.65, 0.25])
    assert [r["is_copy"] for r in table[:2]] == [True, False]


def test_an_empty_chunk_is_written_without_searching(tmp_path):
    index = FakeIndex()
    steps, written = _scan(tmp_path, index)
    steps(QueryChunk(0, "images", ("a.jpg",), ("a.jpg",)), _embedded(0, rejected=1), embed_crops=None)
    assert index.searched == [] and written[0]["queries"] == 1 and written[0]["matches"] == 0


def test_verified_writes_are_handed_on_not_written_here(tmp_path):
    handed = []
    steps, written = _scan(tmp_path, FakeIndex(), verified=lambda chunk, args: handed.append((chunk, args)))
    chunk = QueryChunk(3, "images", ("a.jpg", "b.jpg"), ("a.jpg", "b.jpg"))
    steps(chunk, _embedded(2), embed_crops=None)
    assert written == [] and not (tmp_path / "chunks").exists()
    [(got, args)] = handed
    assert got == chunk and args["chunk"] == 3 and args["out"] == str(tmp_path) and "verify" not in args
    assert args["result"].D_norm.shape == (2, K) and args["marker"]["embed_seconds"] == 0.5


def test_a_failing_chunk_is_listed_and_nothing_is_written(tmp_path):
    steps, written = _scan(tmp_path, FakeIndex(fail=OSError("index shard unreadable")))
    chunk = QueryChunk(1, "images", ("a.jpg",), ("a.jpg",))
    steps(chunk, _embedded(1), embed_crops=None)
    assert steps.failed == [(chunk, "OSError: index shard unreadable")] and written == []
    assert not (tmp_path / "matches").exists()
    other = _scan(tmp_path, FakeIndex(fail=ValueError("a bug")))[0]
    with pytest.raises(ValueError):  # not a chunk failure: the scan stops
        other(chunk, _embedded(1), embed_crops=None)
