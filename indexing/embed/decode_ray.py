"""The decode half of embedding as a Ray task: a source (tar shard or image files) → decoded batches.

A streaming generator (``decode_task``) that an embedding actor starts for each shard or query chunk and
reads batch by batch while it runs the model. It runs on any CPU worker of the cluster, and imports no
torch (nor anything that does): a fresh worker is ready for it in a fraction of a second rather than the
seconds that importing torch takes, which is most of the wait for a job's first batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ray

from copyscan.indexing.embed.decode import DecodedBatch, DecodeLimits, PairSpec, decode_samples
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.read.reader import iter_image_files, iter_tar
from copyscan.indexing.store import storage


def _decode_source(
    source: tuple[str, Any],
    preprocess_spec: dict[str, Any],
    batch_size: int,
    limits: DecodeLimits,
    storage_options: storage.StorageOptions | None,
    pairs: PairSpec | None = None,
    region_spec: dict[str, Any] | None = None,
    draft: bool = False,
) -> Iterator[DecodedBatch]:
    """``source``'s samples decoded into batches (``decode_samples``); with ``draft``, JPEGs decoded at
    the smallest DCT scale that keeps them at least as large as the largest input the preprocessing (and
    the query windows') needs."""
    kind, payload = source
    if kind == "tar":
        samples = iter_tar(payload, storage_options)
    elif kind == "images":
        urls, keys = payload
        samples = iter_image_files(urls, keys, storage_options)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    yield from decode_samples(
        samples,
        make_preprocess(preprocess_spec),
        batch_size,
        limits,
        preprocess_spec["size"],
        pairs,
        make_preprocess(region_spec) if region_spec else None,
        max(int(preprocess_spec["size"]), int(region_spec["size"]) if region_spec else 0) if draft else None,
    )


decode_task = ray.remote(_decode_source)
