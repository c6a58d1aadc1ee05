"""A chunk's embedding in pieces (search/scan_pieces.py): how chunks are cut for the actors there are, that the
pieces' vectors joined are the whole chunk's bit for bit (a real model on real images), also with a piece whose
images were all rejected, and the most pieces a pool can be given."""

from __future__ import annotations

import numpy as np
import pytest

from copyscan.indexing.embed.decode import decode_samples
from copyscan.indexing.embed.stage import embed_batches
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.read.reader import iter_image_files
from copyscan.search.scan_chunks import QueryChunk
from copyscan.search.scan_pieces import (
    MAX_PIECE_BATCHES,
    MIN_PIECE_QUERIES,
    Piece,
    join_pieces,
    most_pieces,
    plan_pieces,
)


def _images(n: int, chunk_size: int) -> list[QueryChunk]:
    urls = [f"/q/{i:06d}.jpg" for i in range(n)]
    return [
        QueryChunk(
            i // chunk_size, "images", tuple(urls[i : i + chunk_size]), tuple(urls[i : i + chunk_size])
        )
        for i in range(0, n, chunk_size)
    ]


@pytest.mark.parametrize(
    ("queries", "chunk_size", "actors", "batch"),
    [
        (250, 1024, 1, 64),
        (250, 1024, 2, 64),
        (250, 1024, 4, 64),
        (5000, 1024, 2, 64),
        (7, 3, 3, 4),
        (1, 5, 8, 2),
        (500, 500, 4, 8),
    ],
)
def test_pieces_cover_each_chunk_in_whole_batches(queries, chunk_size, actors, batch):
    chunks = _images(queries, chunk_size)
    plan = plan_pieces(chunks, actors, 2, batch)
    assert len(plan) == len(chunks)
    for chunk, pieces in zip(chunks, plan, strict=True):
        assert [p.chunk for p in pieces] == [chunk] * len(pieces)
        assert pieces[0].start == 0 and pieces[-1].stop == len(chunk.urls)
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:], strict=False))
        most = max(MAX_PIECE_BATCHES * batch, MIN_PIECE_QUERIES)
        for p in pieces[:-1]:  # whole batches, at least MIN_PIECE_QUERIES (rounded up to a batch)
            assert p.size % batch == 0 and min(MIN_PIECE_QUERIES, len(chunk.urls)) <= p.size <= most
        joined = [u for p in pieces for u in p.queries.urls]
        assert joined == list(chunk.urls) and all(p.queries.chunk == chunk.chunk for p in pieces)


def test_a_small_scan_gives_every_actor_work_and_a_long_one_cuts_its_tail_finer():
    (pieces,) = plan_pieces(_images(250, 1024), 2, 2, 64)
    assert [p.size for p in pieces] == [64, 64, 64, 58]  # 4 slots (2 actors x 2 calls), one batch each
    assert len(plan_pieces(_images(250, 1024), 1, 2, 64)[0]) == 4  # one batch each: no smaller piece
    long = plan_pieces(_images(20 * 1024, 1024), 2, 2, 64)
    sizes = [max(p.size for p in pieces) for pieces in long]
    assert sizes[0] == MAX_PIECE_BATCHES * 64 and sizes[-1] == 128  # 8 pieces for 4 slots
    assert sizes == sorted(sizes, reverse=True)
    (small,) = plan_pieces(_images(100, 1024), 4, 2, 4)  # batches of 4: pieces of 64 queries, not of 4
    assert [p.size for p in small] == [64, 36]
    tar = QueryChunk(0, "tar", ("/q/000.tar",))
    assert [[(p.start, p.stop)] for p in plan_pieces([tar], 4, 2, 64)[0]] == [[(0, 0)]]


def test_pieces_joined_are_the_whole_chunk_bit_for_bit(real_images):
    files = [str(p) for p in real_images[:10]]
    embedder = load_embedder("effnet-lite0", None, "cpu", None)
    preprocess = make_preprocess(embedder.spec["preprocess"])

    def embed(urls):
        samples = iter_image_files(urls, urls)
        return embed_batches(decode_samples(samples, preprocess, 4), embedder)

    whole = embed(files)
    chunk = QueryChunk(0, "images", tuple(files), tuple(files))
    pieces = [Piece(chunk, 0, 4), Piece(chunk, 4, 8), Piece(chunk, 8, 10)]  # as plan_pieces cuts, batch 4
    joined = join_pieces([embed(list(p.queries.urls)) for p in pieces])
    assert np.array_equal(joined.xb, whole.xb)
    assert joined.records == whole.records and joined.rejections == whole.rejections


def test_a_piece_whose_images_were_all_rejected_joins_with_the_others(real_images, tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"not a jpeg")
    embedder = load_embedder("effnet-lite0", None, "cpu", None)
    preprocess = make_preprocess(embedder.spec["preprocess"])

    def embed(urls):
        return embed_batches(decode_samples(iter_image_files(urls, urls), preprocess, 2), embedder)

    good = [str(p) for p in real_images[:2]]
    joined = join_pieces([embed(good), embed([str(bad)])])
    assert joined.xb.shape == (2, embedder.dim) and len(joined.records) == 2
    assert [r["key"] for r in joined.rejections] == [str(bad)]


def test_most_pieces_counts_pieces_of_the_smallest_size():
    chunks = _images(250, 100)  # 100 + 100 + 50 queries
    assert most_pieces(chunks, 64) == 2 + 2 + 1
    assert most_pieces(chunks, 4) == 2 + 2 + 1  # pieces of 64 queries, not of one batch of 4
    for batch in (4, 64):  # an upper bound of what plan_pieces cuts, for any number of actors
        assert all(
            sum(map(len, plan_pieces(chunks, a, 2, batch))) <= most_pieces(chunks, batch) for a in (1, 8)
        )
    assert most_pieces([QueryChunk(0, "tar", ("/q/000.tar",))], 64) == 1
