"""The report's searches of the index: training images as queries, one index shard in memory at a time.

train→train: a seeded sample of the index's training images is searched shard by shard, and the best match
that is not the image itself is kept (Somepalli's "second-nearest", robust to ANN misses and exact
duplicates). Near-duplicates: for each training image, the other training images within
``duplicate_radius``, by range search on every index shard at ``duplicate_radius − duplicate_margin`` (PQ
scores are approximate) and exact re-scoring of what it returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import resolve
from copyscan.search.ann.normalise import ScoreNormaliser, whiten
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.ann.topk import carry_values, merge_topk
from copyscan.search.report.config import ReportConfig


def sample_ids(manifest: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """(≤ n,) packed ids of training images, uniformly at random (seeded) over the whole index."""
    entries = [e for e in manifest["embedding_shards"] if e["count"] > 0]
    counts = np.array([e["count"] for e in entries], dtype=np.int64)
    total = int(counts.sum())
    if total == 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    which = np.searchsorted(np.cumsum(counts), flat, side="right")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards = np.array([e["shard"] for e in entries], dtype=np.int64)[which]
    return (shards << layout.ROW_BITS) | (flat - starts[which]).astype(np.int64)


def stored_vectors(index_url: str, manifest: dict[str, Any], ids: np.ndarray, so=None) -> np.ndarray:
    """(n, d) float32 raw descriptors of packed ``ids``, read from the index's embedding shards."""
    emb = {e["shard"]: e for e in manifest["embedding_shards"]}
    out = np.zeros((len(ids), int(manifest["dim"])), dtype=np.float32)
    shard, row = layout.unpack_ids(ids)
    for s in np.unique(shard):
        sel = shard == s
        vectors = storage.load_npy(resolve(index_url, emb[int(s)]["img_emb"]), so, mmap=True)
        out[sel] = np.asarray(vectors[row[sel]], dtype=np.float32)
    return out


def shard_searchers(cfg: ReportConfig, index_url: str, manifest: dict[str, Any]) -> Iterator[ShardSearcher]:
    """One ShardSearcher per index shard, built when needed: one shard's index in memory at a time."""
    nprobe = cfg.nprobe or int(manifest["index"].get("nprobe") or 0)
    for entry in manifest["index_shards"]:
        searcher = ShardSearcher(
            index_url, manifest, [entry["index_shard"]], cfg.cache_dir, cfg.storage_options
        )
        if nprobe:
            searcher.set_nprobe(nprobe)
        yield searcher


def train_train(
    cfg: ReportConfig, index_url: str, manifest: dict[str, Any], ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Best match other than itself for each training image ``ids`` ((n,) int64 packed ids).

    Returns {"id": ids, "neighbour": (n,) int64 (-1: none), "score", "score_raw", "score_norm": (n,)
    float32, NaN where there is no neighbour}.
    """
    xq = stored_vectors(index_url, manifest, ids, cfg.storage_options)
    parts, raw_parts = [], []
    for searcher in shard_searchers(cfg, index_url, manifest):
        result = searcher.search(xq, 2, max(cfg.candidates, 2))
        parts.append((result.D, result.I))
        raw_parts.append((result.I, result.D_raw))
    D, I = merge_topk(parts, 2)
    D_raw = carry_values(I, raw_parts)
    rows = np.arange(len(ids))
    other = np.where(I[:, 0] == ids, 1, 0)
    I_other, D_other = I[rows, other], D[rows, other]
    normaliser = ScoreNormaliser(index_url, manifest, 1.0, cfg.storage_options)
    norm = normaliser(xq, D_other[:, None], I_other[:, None], exclude=ids)[:, 0]
    valid = I_other >= 0
    return {
        "id": ids,
        "neighbour": I_other,
        "score": np.where(valid, D_other, np.nan).astype(np.float32),
        "score_raw": np.where(valid, D_raw[rows, other], np.nan).astype(np.float32),
        "score_norm": norm.astype(np.float32),
    }


def near_duplicates(
    cfg: ReportConfig, index_url: str, manifest: dict[str, Any], ids: np.ndarray
) -> np.ndarray:
    """(n,) int64: how many *other* training images have ``score`` ≥ duplicate_radius with each of ``ids``."""
    counts = np.zeros(len(ids), dtype=np.int64)
    if len(ids) == 0:
        return counts
    xq = stored_vectors(index_url, manifest, ids, cfg.storage_options)
    for searcher in shard_searchers(cfg, index_url, manifest):
        xw = whiten(searcher.whitening, xq)
        for index in searcher.indexes.values():
            lims, _, I = index.range_search(xw, float(cfg.duplicate_radius - cfg.duplicate_margin))
            if len(I) == 0:
                continue
            owner = np.repeat(np.arange(len(ids)), np.diff(lims).astype(np.int64))
            keep = I != ids[owner]
            owner, I = owner[keep], I[keep]
            exact = searcher.pair_scores(xw, owner, I)
            np.add.at(counts, owner[exact >= cfg.duplicate_radius], 1)
    return counts
