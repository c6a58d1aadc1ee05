"""Calibration of whole-copy verification: the thresholds of ``verify_score`` for scans with ``verify_whole=N``.

A scan with whole-copy verification (``copyscan.search.verify.whole``) answers each generation with its
verified candidate of ``verify_rank`` 0 and scores it by ``verify_score``, a different score from the
``score_norm`` the plain calibration thresholds: its p90 says nothing about ``verify_score``. With
``copyscan calibrate verify_whole=N`` the calibration runs the same verification on its own copies
(``copyscan.search.calibrate.whole``):

- a copy's *answer*: its N best global matches, each verified against the copy (the block-10 map's
  ``peak``), scored by ``whole_scores`` as the scan scores them; a true match when ``verify_rank`` 0 is the
  copy's source;
- the copy's *negative*, standing for a generation that copies nothing: the same with its N best matches
  other than its source, their ``score_norm`` as if the source were absent (held out of the whitening's fit
  where the plain calibration holds it out, ``copyscan.search.calibrate.heldout.held_out_hits``), so the
  source is neither a candidate nor in the others' background; its score is the best ``verify_score`` there.

The thresholds come from the same ``precision_table`` as ``score_norm``'s, and go into the calibration
under ``verify_score`` with the verification settings they hold for (``verify_settings``): a scan flags
``is_copy`` on ``verify_score`` only when it verifies with the same (``resolve_threshold``).

Cost: one feature map per copy (224 px) and per distinct candidate (320 px), and N to 2N small correlations
per copy; each candidate's image is read back from the source shards once, its map dropped after its pairs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from copyscan.indexing.store import layout
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.topk import ShardResult
from copyscan.search.calibrate.heldout import other_columns
from copyscan.search.calibrate.sample import read_back
from copyscan.search.verify.dense import DenseMatcher
from copyscan.search.verify.whole import WholeSpec, peak, whole_matcher, whole_scores

logger = logging.getLogger("copyscan")


def verify_settings(spec: WholeSpec) -> dict[str, Any]:
    """The settings ``verify_score`` depends on (a calibrated threshold holds for scans with the same)."""
    return {
        "verify_whole": spec.ranks,
        "verify_whole_weight": spec.weight,
        "query_side": spec.query_side,
        "train_side": spec.train_side,
        "fractions": list(spec.fractions),
    }


class QueryMaps:
    """The copies' feature maps, kept as they are made (``copyscan.search.calibrate.whole._copies``)."""

    def __init__(self, spec: WholeSpec, matcher: DenseMatcher | None = None):
        self.spec = spec
        self.matcher = matcher or whole_matcher(spec)
        self.maps: list[torch.Tensor] = []

    def __call__(self, copy) -> None:
        self.maps.append(self.spec.query_map(self.matcher, copy))


def verified_scores(
    cfg: Any,
    manifest: dict[str, Any],
    queries: QueryMaps,
    xq: np.ndarray,
    sources: np.ndarray,
    held_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    result: ShardResult,
    normaliser: ScoreNormaliser,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Verify the copies (module docstring). ``xq``: (n, d) float32 raw descriptors of the copies whose maps
    ``queries`` holds, in the same order; ``sources``: (n,) int64 packed ids; ``held_out``: each copy's
    ``held_out_hits`` with k = N (None: negatives in the index's whitening); ``result``: the copies' top
    N + 1 in the index, ``normaliser`` its score normalisation with β = 1.

    Returns (correct (n,) bool: the answer is the source, answer scores (n,), negative scores (n,), counts),
    scores float64, -inf where nothing was verified."""
    spec = queries.spec
    n_ranks = spec.ranks
    top_I = result.I[:, :n_ranks]
    top_norm = normaliser(xq, result.D[:, :n_ranks], top_I)
    if held_out is not None:
        _, neg_norm, neg_I = held_out
    else:  # the N best other than the source, normalised as if it were not in the background either
        other = other_columns(result.I, sources, n_ranks)
        neg_I = np.take_along_axis(result.I, other, 1)
        neg_norm = normaliser(xq, np.take_along_axis(result.D, other, 1), neg_I, exclude=sources)
    top_peaks, neg_peaks, failed = _peaks(cfg, manifest, queries, top_I, neg_I)
    correct, top = _answers(top_I, top_norm, top_peaks, spec.weight, sources)
    _, negative = _answers(neg_I, neg_norm, neg_peaks, spec.weight, None)
    counts = {
        "recall@1": float(correct.mean()),
        "pairs": int(np.isfinite(top_peaks).sum() + np.isfinite(neg_peaks).sum()),
        "failed": failed,
    }
    return correct, top, negative, counts


def _answers(
    I: np.ndarray, norm: np.ndarray, peaks: np.ndarray, weight: float, sources: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(answer is the source (n,) bool, answer's verify_score (n,) float64, -inf where none) of candidates
    ``I`` (n, N) with their score_norm and peaks (n, N), scored per copy as the scan scores a generation."""
    n, k = I.shape
    query_ids = np.repeat(np.arange(n), k).tolist()
    score, rank = whole_scores(query_ids, norm.reshape(-1), peaks.reshape(-1).astype(np.float32), weight)
    score, rank = score.reshape(n, k), rank.reshape(n, k)
    has = (rank == 0).any(axis=1)
    col = np.argmax(rank == 0, axis=1)
    rows = np.arange(n)
    best = np.where(has, score[rows, col], -np.inf).astype(np.float64)
    correct = has & (I[rows, col] == sources) if sources is not None else np.zeros(n, dtype=bool)
    return correct, best


def _peaks(
    cfg: Any, manifest: dict[str, Any], queries: QueryMaps, *candidates: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The peak of every (copy, candidate) pair of each (n, N) id array of ``candidates`` (NaN where the
    candidate is -1, could not be read back, or the copy fits it nowhere), and the count of candidates that
    could not be read back. Each distinct candidate is read and mapped once; its map is dropped after its
    pairs, so memory holds the copies' maps and one candidate's."""
    spec = queries.spec
    out = [np.full(c.shape, np.nan, dtype=np.float32) for c in candidates]
    pairs: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # id -> (array, copy, column)
    for a, ids in enumerate(candidates):
        for i, j in zip(*np.nonzero(ids >= 0), strict=True):
            pairs[int(ids[i, j])].append((a, int(i), int(j)))
    shards, rows = layout.unpack_ids(np.fromiter(pairs, dtype=np.int64, count=len(pairs)))
    wanted: dict[int, list[int]] = defaultdict(list)
    for shard, row in zip(shards.tolist(), rows.tolist(), strict=True):
        wanted[shard].append(row)
    by_shard = {s: np.sort(np.asarray(r, dtype=np.int64)) for s, r in wanted.items()}
    failed = 0
    for shard, row, key, img, why in read_back(cfg.index, manifest, by_shard, cfg.storage_options):
        if img is None:
            failed += 1
            logger.warning("calibrate: candidate %s of shard %d not verified: %s", key, shard, why)
            continue
        train = spec.train_map(queries.matcher, img)
        for a, i, j in pairs[int(layout.pack_ids(shard, np.array([row]))[0])]:
            found = peak(queries.maps[i], train, spec.fractions)
            out[a][i, j] = np.nan if found is None else found
    return (*out, failed)
