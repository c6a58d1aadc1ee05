"""Query chunks cut into embedding pieces, so that every embedding actor has work (no Ray here).

A chunk (``search/scan_chunks.py``) stays the unit of search, output and resume: its id and its queries never
depend on the cluster. Its *embedding* is split into pieces that any embedding actor may take: a 250-query
chunk on two actors is embedded by both, and the last chunks of a long run are cut finer so that the run's
tail does not leave actors idle. A piece holds whole batches (``batch_size`` queries, the last one
excepted), so its forward passes see the same batches as the whole chunk would: the chunk's vectors, joined
in order from its pieces (``join_pieces``), are those of one pass over the chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from copyscan.indexing.embed.stage import EmbeddedSource
from copyscan.search.scan_chunks import QueryChunk

# A piece holds at most this many batches: a long chunk then reports progress piece by piece, and costs one
# more decode task per piece (milliseconds) against seconds of embedding on a CPU.
MAX_PIECE_BATCHES = 4
# ... and at least this many queries (in whole batches): below it, a piece's actor call and decode task cost
# about what its forward passes do on a CPU (tens of ms a query), so cutting finer saves nothing
MIN_PIECE_QUERIES = 64


@dataclass(frozen=True)
class Piece:
    """Queries ``start:stop`` of a chunk (a tar chunk is one piece: the whole shard)."""

    chunk: QueryChunk
    start: int
    stop: int

    @property
    def queries(self) -> QueryChunk:
        """The piece as a chunk of its own (what an embedding actor is given)."""
        if self.chunk.kind == "tar":
            return self.chunk
        c = self.chunk
        return QueryChunk(c.chunk, c.kind, c.urls[self.start : self.stop], c.keys[self.start : self.stop])

    @property
    def size(self) -> int:
        """Queries in the piece (a tar's are unknown before it is read: 0)."""
        return 0 if self.chunk.kind == "tar" else self.stop - self.start

    def describe(self) -> str:
        if self.chunk.kind == "tar" or (self.start, self.stop) == (0, len(self.chunk.urls)):
            return self.chunk.describe()
        return f"{self.chunk.describe()}, queries {self.start}-{self.stop - 1}"


def chunk_queries(chunk: QueryChunk) -> int:
    """Queries of ``chunk`` known before reading it (image files; 0 for a tar)."""
    return 0 if chunk.kind == "tar" else len(chunk.urls)


def plan_pieces(
    chunks: Sequence[QueryChunk], actors: int, per_actor: int, batch_size: int
) -> list[list[Piece]]:
    """Each chunk's pieces, in chunk order.

    A chunk of image files is cut into pieces of ``w`` whole batches, ``w`` the batches that give each of
    the ``actors × per_actor`` embedding slots two pieces of the queries left from this chunk on (this
    chunk and the later ones), between the batches of ``MIN_PIECE_QUERIES`` (one batch of 64) and
    ``MAX_PIECE_BATCHES`` (or that minimum, if more), nor more than the chunk. A
    long run's first chunks are thus cut into ``MAX_PIECE_BATCHES``-batch pieces and its last ones finer,
    so that at the end no actor waits for more than a small piece of another's; a chunk of 250 queries on
    2 actors with 2 calls each is cut into 4 pieces of one batch of 64. A tar chunk is one piece."""
    slots = max(1, actors * per_actor)
    left = sum(chunk_queries(c) for c in chunks)
    plan = []
    for chunk in chunks:
        n = chunk_queries(chunk)
        if chunk.kind == "tar" or n == 0:
            plan.append([Piece(chunk, 0, n)])
            left -= n
            continue
        batches = -(-left // (2 * slots * batch_size))  # two pieces per slot of the work left
        fewest = _fewest_batches(batch_size)
        size = batch_size * max(fewest, min(MAX_PIECE_BATCHES, batches))
        plan.append([Piece(chunk, start, min(start + size, n)) for start in range(0, n, size)])
        left -= n
    return plan


def join_pieces(pieces: Sequence[EmbeddedSource]) -> EmbeddedSource:
    """A chunk's embedding from its pieces' (in order): rows, records and rejections concatenated, times
    summed. One piece is returned as it is."""
    if len(pieces) == 1:
        return pieces[0]

    def cat(name: str) -> np.ndarray | None:
        # a piece whose every image was rejected may carry no array (None) where the others have rows
        arrays = [a for p in pieces if (a := getattr(p, name)) is not None]
        rows = [a for a in arrays if len(a)]
        return np.concatenate(rows) if rows else (arrays[0] if arrays else None)

    return EmbeddedSource(
        xb=cat("xb"),
        records=[r for p in pieces for r in p.records],
        rejections=[r for p in pieces for r in p.rejections],
        decode_seconds=sum(p.decode_seconds for p in pieces),
        embed_seconds=sum(p.embed_seconds for p in pieces),
        decode_task_seconds=sum(p.decode_task_seconds for p in pieces),
        decode_task_cpu_seconds=sum(p.decode_task_cpu_seconds for p in pieces),
        x_regions=cat("x_regions"),
        x_aligned=cat("x_aligned"),
        region_pixels=cat("region_pixels"),
    )


def _fewest_batches(batch_size: int) -> int:
    """The batches of the smallest piece: ``MIN_PIECE_QUERIES``, rounded up to whole batches."""
    return -(-MIN_PIECE_QUERIES // batch_size)


def most_pieces(chunks: Sequence[QueryChunk], batch_size: int) -> int:
    """The pieces ``plan_pieces`` can cut ``chunks`` into at most (each of the smallest size): a pool's
    actor cap."""
    smallest = batch_size * _fewest_batches(batch_size)
    return sum(max(1, -(-chunk_queries(c) // smallest)) for c in chunks)


class Assembly:
    """The pieces' embeddings of each chunk, collected as they arrive (in any order, from any actor); ``add``
    gives a chunk's whole embedding once its last piece is in."""

    def __init__(self, plan: Sequence[Sequence[Piece]]) -> None:
        self.expected = {pieces[0].chunk.chunk: len(pieces) for pieces in plan}
        self.parts: dict[int, dict[int, EmbeddedSource]] = {}

    def add(self, piece: Piece, embedded: EmbeddedSource) -> EmbeddedSource | None:
        parts = self.parts.setdefault(piece.chunk.chunk, {})
        parts[piece.start] = embedded
        if len(parts) < self.expected[piece.chunk.chunk]:
            return None
        del self.parts[piece.chunk.chunk]
        return join_pieces([parts[start] for start in sorted(parts)])

    @staticmethod
    def failed_chunks(failed: Sequence[tuple[Piece, str]]) -> list[tuple[QueryChunk, str]]:
        """The chunks of pieces that failed for good (each once, with its first piece's error)."""
        out: dict[int, tuple[QueryChunk, str]] = {}
        for piece, error in failed:
            out.setdefault(piece.chunk.chunk, (piece.chunk, f"{piece.describe()}: {error}"))
        return list(out.values())
