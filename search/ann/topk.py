"""Top-k lists: what a searcher returns for a block of queries (``ShardResult``), and merging the partial lists
of index shards / searchers into one top-k per query."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np


@dataclass
class ShardResult:
    """Exact top-k of one searcher for a block of queries, with the metadata of the returned ids.

    D: (nq, k) float32 cosine in the index's (whitened) space, descending (a region index with densities:
    that cosine minus ``prior``); I: (nq, k) int64 packed ids (-1 = none); D_raw: (nq, k) float32 cosine of
    the raw descriptors of the same pairs; prior: (nq, k) float32 β · (region density − the index's mean
    density) of each hit, or None;
    D_norm: (nq, k) float32 score-normalised D (copyscan.search.ann.normalise), set after merging;
    meta: id → {"train_key", "train_url", "caption", "index_shard"};
    truncated: (nq,) bool, with a range search (``copyscan.search.ann.radius``): queries that had more matches
    above their floor than the extra ones kept.
    """

    D: np.ndarray
    I: np.ndarray
    D_raw: np.ndarray
    meta: dict[int, dict[str, Any]]
    D_norm: np.ndarray | None = None  # (nq, k) score_norm, filled in by the driver after the merge
    split: np.ndarray | None = None  # (nq, k) split product (copyscan.search.regions), when the scan asks
    prior: np.ndarray | None = None  # (nq, k) subtracted from the hits' cosines (region densities)
    truncated: np.ndarray | None = None  # (nq,) bool: more matches above the radius than were kept


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``parts`` [(D, I)], each (nq, k_i) with higher-is-better scores, into (D, I) of shape (nq, k).

    Uses faiss.ResultHeap (keep_max=True, for inner products); missing results are (-inf, -1).
    """
    if not parts:
        raise ValueError("nothing to merge")
    nq = parts[0][0].shape[0]
    heap = faiss.ResultHeap(nq, k, keep_max=True)
    for D, I in parts:
        if D.shape[0] != nq or I.shape != D.shape:
            raise ValueError(f"part of shape {D.shape}/{I.shape} does not match nq={nq}")
        D = np.ascontiguousarray(D, dtype=np.float32)
        I = np.ascontiguousarray(I, dtype=np.int64)
        # ResultHeap keeps -1 ids with their scores; give them the worst score so they never win.
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        heap.add_result(D, I)
    heap.finalize()
    D, I = heap.D, heap.I
    # Empty slots come back as (-FLT_MAX, -1); report them as (-inf, -1) like the inputs.
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    return D, I


def carry_values(
    I: np.ndarray, parts: Sequence[tuple[np.ndarray, np.ndarray]], fill: float = np.nan
) -> np.ndarray:
    """For merged ids ``I`` (nq, k), the value each id had in the part it came from.

    parts: [(I_p, V_p)], each (nq, k_p) ids and per-result values (e.g. raw scores). Returns (nq, k)
    float32, ``fill`` where the id is -1 or absent from every part.
    """
    out = np.full(I.shape, fill, dtype=np.float32)
    rows = np.arange(I.shape[0])
    for Ip, Vp in parts:
        for j in range(I.shape[1]):
            match = (Ip == I[:, j : j + 1]) & (I[:, j : j + 1] >= 0)
            found = match.any(axis=1)
            out[found, j] = Vp[rows[found], match.argmax(axis=1)[found]]
    return out


def merge_sorted_with(parts: Sequence[tuple[np.ndarray, ...]], k: int) -> tuple[np.ndarray, ...]:
    """Merge ``parts`` [(D, I, *values)], each (nq, k_i) of any width, into the best ``k`` by D of each query
    with every result's values carried along: (D, I, *values) of min(k, Σ k_i) columns, D descending,
    (-inf, -1, NaN) where a query has fewer results.

    For wide rows (range search: k + hundreds of extra matches), where ``carry_values``' search of every
    id in every part would cost nq · k · k_i."""
    D = np.hstack([np.where(p[1] < 0, -np.inf, p[0]).astype(np.float32) for p in parts])
    I = np.hstack([p[1] for p in parts]).astype(np.int64)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    I = np.take_along_axis(I, order, 1)
    out = [np.take_along_axis(D, order, 1), I]
    for j in range(2, len(parts[0])):
        values = np.take_along_axis(np.hstack([p[j] for p in parts]).astype(np.float32), order, 1)
        out.append(np.where(I < 0, np.nan, values))
    return tuple(out)
