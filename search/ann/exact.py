"""Exact scores of a block of queries with their candidates, each distinct stored vector read once.

The candidate lists of a block of queries overlap (the windows of one generation, near-duplicate queries, a
small index), so a block's distinct candidates are gathered and converted once. When they are few for the
block (at most ``DENSE_PER_CANDIDATE`` times its candidates per query), one matrix product of the queries
with all of them costs less than a dot product per (query, candidate) pair, and the pairs are read out of it.
"""

from __future__ import annotations

import numpy as np

# the product of the whole block runs at tens of GFLOP/s, the pairs' dot products are bound by memory
# (about 20x fewer per second on one core): 8 keeps the dense product the cheaper one with a margin
DENSE_PER_CANDIDATE = 8


def distinct(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids: (nb, c) int64 candidates (-1 = none) → (u,) the distinct ids, sorted, and (nb, c) int64 the
    position of every candidate in them."""
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, inverse.reshape(ids.shape)


def pair_dots(queries: np.ndarray, vectors: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """queries: (nb, m, e) float32, m query-side vectors per query; vectors: (u, e) float32, the distinct
    candidates; inverse: (nb, c) int64, each query's candidates as rows of ``vectors`` → (nb, m, c) float32
    dot products of every query-side vector with every candidate of its query."""
    nb, m, e = queries.shape
    u = len(vectors)
    if u <= DENSE_PER_CANDIDATE * inverse.shape[1]:
        full = (queries.reshape(nb * m, e) @ vectors.T).reshape(nb, m, u)
        return np.take_along_axis(full, inverse[:, None, :], axis=2)
    return np.matmul(queries, vectors[inverse].transpose(0, 2, 1))


def through_stages(dots: np.ndarray, terms: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Whitened scores from raw dot products ``x·b`` (``whitened_score_terms``): per stage, subtract the
    query's term and divide by the stored vector's norm. terms, norms: (..., stages), broadcast to dots."""
    with np.errstate(divide="ignore", invalid="ignore"):  # -1 ids: zero norms, masked by the callers
        for stage in range(terms.shape[-1]):
            dots = (dots - terms[..., stage]) / norms[..., stage]
    return dots.astype(np.float32)
