"""Train once on a sample, fill index shards from embedding shards, write each shard atomically.

The trained (empty) index is written to ``trained.index``; each fill reads it, streams its group of
embedding shards one at a time (never all vectors in one process), adds them with packed
(shard, row) ids, writes ``shard-NNNNN.index`` (temp name, then move) and then its JSON marker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np

from indexing import layout, storage
from indexing.errors import CopyscanError

ADD_BATCH = 65_536


def sample_training_vectors(
    out: str,
    counts: Mapping[int, int],
    train_size: int,
    seed: int = 0,
    storage_options: storage.StorageOptions | None = None,
) -> np.ndarray:
    """A seeded sample of ~``train_size`` stored vectors, (n, d) float32, reading few shards.

    Shards are visited in a seeded random order and each contributes a random subset of up to
    ``per_shard`` rows, ``per_shard`` chosen so that about 4× fewer shards than all are read when the
    collection is large; memory stays O(train_size · d).
    """
    rng = np.random.default_rng(seed)
    shards = [s for s in sorted(counts) if counts[s] > 0]
    if not shards:
        raise CopyscanError("no vectors to train on")
    total = sum(counts[s] for s in shards)
    train_size = max(1, min(train_size, total))  # a flat index needs one vector, for its dimension
    per_shard = max(1, -(-train_size * 4 // len(shards)))
    parts: list[np.ndarray] = []
    taken = 0
    for shard in rng.permutation(shards):
        if taken >= train_size:
            break
        xb = storage.load_npy(layout.emb_url(out, int(shard)), storage_options, mmap=True)
        want = min(per_shard, xb.shape[0], train_size - taken)
        rows = np.sort(rng.choice(xb.shape[0], size=want, replace=False))
        parts.append(np.asarray(xb[rows], dtype=np.float32))
        taken += want
    return np.concatenate(parts)


def train_index(factory: str, xt: np.ndarray, seed: int = 0) -> faiss.Index:
    """Create ``factory`` (inner-product metric) and train it on ``xt`` (n, d) float32."""
    d = xt.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CopyscanError(f"faiss cannot build index_factory {factory!r} for d={d}: {exc}") from None
    _seed_clustering(index, seed)
    if not index.is_trained:
        index.train(np.ascontiguousarray(xt, dtype=np.float32))
    return index


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed


def write_index(index: faiss.Index, url: str, storage_options: storage.StorageOptions | None = None) -> int:
    """Serialize ``index`` to ``url`` (via a local temp file, then an atomic move). Returns its size."""
    with storage.local_scratch() as tmp:
        local = os.path.join(tmp, "index")
        faiss.write_index(index, local)
        size = os.path.getsize(local)
        storage.upload_file(local, url, storage_options)
    return size


def read_index(url: str, storage_options: storage.StorageOptions | None = None) -> faiss.Index:
    if storage.is_local(url):
        return faiss.read_index(storage.local_path(url))
    with storage.local_scratch() as tmp:
        local = os.path.join(tmp, "index")
        storage.download_file(url, local, storage_options)
        return faiss.read_index(local)


def fill_index_shard(
    out: str,
    factory: str,
    index_shard: int,
    emb_shards: Sequence[int],
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """Add the vectors of ``emb_shards`` to a copy of the trained index and write index shard ``index_shard``.

    Returns the marker dict (also written, last, to ``shard-NNNNN.json``).
    """
    t0 = time.perf_counter()
    index = read_index(layout.trained_index_url(out, factory), storage_options)
    counts: dict[str, int] = {}
    for shard in emb_shards:
        xb = storage.load_npy(layout.emb_url(out, shard), storage_options, mmap=True)
        n = xb.shape[0]
        for start in range(0, n, ADD_BATCH):
            chunk = np.ascontiguousarray(xb[start : start + ADD_BATCH], dtype=np.float32)
            ids = layout.pack_ids(shard, np.arange(start, start + chunk.shape[0]))
            index.add_with_ids(chunk, ids)
        counts[str(shard)] = int(n)
    size = write_index(index, layout.index_shard_url(out, factory, index_shard), storage_options)
    marker = {
        "index_shard": index_shard,
        "factory": factory,
        "url": layout.index_shard_url(out, factory, index_shard),
        "ntotal": int(index.ntotal),
        "embedding_shards": [int(s) for s in emb_shards],
        "counts": counts,
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(layout.index_shard_marker_url(out, factory, index_shard), marker, storage_options)
    return marker


def index_shard_marker(
    out: str, factory: str, index_shard: int, storage_options: storage.StorageOptions | None = None
) -> dict[str, Any] | None:
    url = layout.index_shard_marker_url(out, factory, index_shard)
    if not storage.exists(url, storage_options):
        return None
    return storage.read_json(url, storage_options)
