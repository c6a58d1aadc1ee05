"""Every match above a score-normalised threshold: range search with the normalisation folded in.

A scan normally keeps each generation's top k. A training image duplicated 500 times in LAION, copied by
a generation, then shows up 10 times; ``radius`` (scan option) keeps the top k *plus* every further
training image with ``score_norm >= radius``, up to ``radius_max`` more per generation.

``score_norm(q, r) = score(q, r) - β · bias(q, r)`` (METHODS.md §1): a per-query threshold on the index's
inner product. METHODS.md folds it into the search with one extra dimension, q' = [q, -β·bias(q)] and
r' = [r, 1], so that one radius serves every query. Adding a constant dimension to IVF-PQ codes that are
already built is not possible, but the same fold divides through: for a positive per-query floor lo(q),

    [q, -lo(q)] · [r, 1] >= 0   <=>   q · r >= lo(q)   <=>   (q / lo(q)) · r >= 1,

and inner-product search is linear in the query (coarse assignment aside, which is done with the query
itself), so a whole query block is range-searched against radius 1 with the codes as built
(``SharedCoarse.range_search``, ``range_search_index``).

The floor must hold for every training image: bias(q, r) leaves r itself out of q's background, so it
varies with r; ``BackgroundSample.floor`` is its lowest possible value (the nearest background image left
out), and lo(q) = radius + β · floor(q) <= radius + β · bias(q, r) for every r. The approximate scores
are searched down to lo(q) - ``radius_margin`` (PQ error), re-ranked exactly against lo(q) by the scan
actors, and the driver keeps what passes ``score_norm >= radius`` exactly (``keep_above``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import faiss
import numpy as np

from copyscan.search.ann.topk import ShardResult

# The fold divides by the floor: a query whose approximate-score floor is below this (a low or negative
# radius) would range-search most of the probed lists, so it takes its approximate top k + extra instead,
# scored exactly against the same floor (counted as "deep" in the chunk marker)
MIN_TAU = 0.02


@dataclass(frozen=True)
class Above:
    """What a scan actor adds to a query block's top k: every vector with exact score >= ``lo`` (nq,)
    float32 (NaN: none for that query), at most ``extra`` more per query, found by range search down to
    ``lo - margin``."""

    lo: np.ndarray
    extra: int
    margin: float

    def tau(self) -> tuple[np.ndarray, np.ndarray]:
        """(tau, deep): every query's approximate-score floor lo - margin, (nq,) float32 (+inf where lo is
        NaN: no extra matches), and the queries too low to range-search (tau < MIN_TAU), which take their
        approximate top k + extra instead."""
        tau = np.asarray(self.lo, dtype=np.float32) - np.float32(self.margin)
        tau = np.where(np.isfinite(tau), tau, np.inf).astype(np.float32)
        return tau, np.isfinite(tau) & (tau < MIN_TAU)


def range_search_index(index: faiss.Index, xq: np.ndarray, tau: np.ndarray) -> tuple:
    """(lims, D, I) of every vector of ``index`` with score >= ``tau[i]`` for query ``i`` (the fold: the
    query scaled by 1 / tau, radius 1), D in score units. For flat shards and IVF shards that do not share
    a coarse quantizer; the index may hold no affine transform (a transform's bias does not scale)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            transform = faiss.downcast_VectorTransform(inner.chain.at(i))
            if not isinstance(transform, faiss.LinearTransform) or transform.have_bias:
                raise ValueError(f"cannot fold a per-query radius through {type(transform).__name__}")
    scale = np.asarray(tau, dtype=np.float32)[:, None]
    lims, D, I = index.range_search(np.ascontiguousarray(xq / scale, dtype=np.float32), 1.0)
    return lims, D * np.repeat(scale[:, 0], np.diff(lims).astype(np.int64)), I


def capped(lims: np.ndarray, D: np.ndarray, I: np.ndarray, cap: int) -> tuple[np.ndarray, ...]:
    """A range search's results cut to each query's ``cap`` best: (owner, I, D) flat arrays (owner = the
    query row of each result) and (nq,) bool, the queries that had more than ``cap``."""
    counts = np.diff(lims).astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((-D, owner))
    position = np.arange(len(order)) - np.repeat(lims[:-1].astype(np.int64), counts)
    keep = order[position < cap]
    return owner[keep], I[keep], D[keep], counts > cap


def keep_above(result: ShardResult, k: int, radius: float) -> ShardResult:
    """``result`` (merged, with D_norm) with every match past the first ``k`` of a query that does not reach
    ``score_norm >= radius`` removed, the rest moved up in score order. The top k stay as they are."""
    I = result.I.copy()
    drop = ~(result.D_norm >= radius)  # NaN: unknown, dropped
    drop[:, :k] = False
    I[drop] = -1
    order = np.argsort(I < 0, axis=1, kind="stable")  # kept first, each group in score order
    width = max(int((I >= 0).sum(1).max(initial=0)), min(k, I.shape[1]))

    def take(values: np.ndarray | None, fill: float) -> np.ndarray | None:
        if values is None:
            return None
        out = np.take_along_axis(values, order, 1)[:, :width].copy()
        out[np.take_along_axis(I, order, 1)[:, :width] < 0] = fill
        return out

    return dataclasses.replace(
        result,
        D=take(result.D, -np.inf),
        I=np.take_along_axis(I, order, 1)[:, :width],
        D_raw=take(result.D_raw, np.nan),
        D_norm=take(result.D_norm, np.nan),
        split=take(result.split, np.nan),
        prior=take(result.prior, 0.0),
    )


def radius_counts(result: ShardResult, k: int, above: Above) -> dict[str, int]:
    """A chunk's range-search counts for its marker: matches past the top k, the queries with any, queries
    that may have had more than were kept (truncated), queries searched as a top k + extra because their
    floor was too low to range-search (deep), and queries with no floor (no background: top k only)."""
    extra = result.I[:, k:] >= 0
    return {
        "extra_matches": int(extra.sum()),
        "queries_with_extra": int(extra.any(1).sum()),
        "truncated": int(result.truncated.sum()) if result.truncated is not None else 0,
        "deep": int(above.tau()[1].sum()),
        "no_floor": int((~np.isfinite(above.lo)).sum()),
    }


def extra_columns(
    found: list[tuple[np.ndarray, ...]], nq: int, extra: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kept extras ``found`` ([(owner, ids, exact, raw)]) as columns to append to the top k: each
    query's best ``extra`` by exact score, (D_x, I_x, R_x): (nq, width) float32 / int64 / float32 padded
    with -inf / -1 / NaN, and (nq,) bool: the queries that had more than ``extra``."""
    owner, ids, exact, raw_scores = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((-exact, owner))
    owner, ids, exact, raw_scores = owner[order], ids[order], exact[order], raw_scores[order]
    counts = np.bincount(owner, minlength=nq)
    position = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = position < extra
    width = int(min(counts.max(initial=0), extra))
    D_x = np.full((nq, width), -np.inf, dtype=np.float32)
    I_x = np.full((nq, width), -1, dtype=np.int64)
    R_x = np.full((nq, width), np.nan, dtype=np.float32)
    at = (owner[keep], position[keep])
    D_x[at], I_x[at], R_x[at] = exact[keep], ids[keep], raw_scores[keep]
    return D_x, I_x, R_x, counts > extra
