"""Split the ``--queries`` argument into deterministic chunks: the unit of embedding, search and output.

Image folders: files sorted by path, ``chunk_size`` per chunk, query_id = path relative to the folder.
Webdataset shards: one chunk per shard, query_id = ``__key__``. The same input and chunk size always
give the same chunks, so ``matches/part-NNNNN.parquet`` names are stable and a rerun skips finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from copyscan.indexing.read.shardlist import list_queries, relative_name
from copyscan.indexing.store import storage


@dataclass(frozen=True)
class QueryChunk:
    chunk: int
    kind: str  # "images" or "tar"
    urls: tuple[str, ...]
    keys: tuple[str, ...] = ()  # query ids of image files (empty for tars: keys come from the shard)

    def describe(self) -> str:
        if self.kind == "tar":
            return f"query chunk {self.chunk:05d} ({self.urls[0]})"
        return f"query chunk {self.chunk:05d} ({len(self.urls)} images from {self.keys[0]})"


def plan_query_chunks(
    spec: str, chunk_size: int, storage_options: storage.StorageOptions | None = None
) -> list[QueryChunk]:
    return plan_queries(spec, chunk_size, storage_options)[0]


def plan_queries(
    spec: str, chunk_size: int, storage_options: storage.StorageOptions | None = None
) -> tuple[list[QueryChunk], list[dict[str, str]]]:
    """The chunks of ``spec``'s queries, and the files of its folder that are not queries, with the reason
    (``copyscan.indexing.read.shardlist.QueryListing``)."""
    listing = list_queries(spec, storage_options)
    return _chunks(spec, listing.kind, listing.urls, chunk_size), listing.skipped


def _chunks(spec: str, kind: str, urls: list[str], chunk_size: int) -> list[QueryChunk]:
    if kind == "shards":
        return [QueryChunk(i, "tar", (url,)) for i, url in enumerate(urls)]
    keys = [relative_name(spec, u) for u in urls]
    return [
        QueryChunk(
            i // chunk_size, "images", tuple(urls[i : i + chunk_size]), tuple(keys[i : i + chunk_size])
        )
        for i in range(0, len(urls), chunk_size)
    ]
