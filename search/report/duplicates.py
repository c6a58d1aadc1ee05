"""How duplicated in the index the matched training images are, against a random sample of training images.

Somepalli et al.: images that generations copy are duplicated 34× in the training set against 12× on
average. The matched images are the run's ``is_copy`` ones (else the best matches ≥ 0.5 on the report's
column), highest-scoring first; each gets the count of its near-duplicates (``neighbours.near_duplicates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from copyscan.search.report.config import ReportConfig
from copyscan.search.report.neighbours import near_duplicates, sample_ids


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate counts of the matched and of the random training images."""

    summary: dict[str, Any]  # stats.json's "duplicates": radius, matched_rule, matched, random
    matched_ids: np.ndarray  # (m,) int64 packed ids
    matched_counts: np.ndarray  # (m,) int64 near-duplicates of each
    random_ids: np.ndarray  # (r,) int64 packed ids
    random_counts: np.ndarray  # (r,) int64


def count_duplicates(
    cfg: ReportConfig,
    index_url: str,
    manifest: dict[str, Any],
    top: pa.Table,
    column: str,
    threshold: dict[str, Any],
) -> Duplicates:
    """Near-duplicates of the training images the best matches ``top`` (rank-0 rows) point at, and of
    ``cfg.duplicate_random`` random ones; ``threshold``: the run's summary threshold ({} when none)."""
    matched_ids = matched_train_ids(top, column, threshold, cfg.duplicate_images)
    random_ids = sample_ids(manifest, cfg.duplicate_random, cfg.seed + 3)
    dup_matched = near_duplicates(cfg, index_url, manifest, matched_ids)
    dup_random = near_duplicates(cfg, index_url, manifest, random_ids)
    summary = {
        "radius": cfg.duplicate_radius,
        "column": "score",
        "matched_rule": _matched_rule(column, threshold),
        "matched": _count_summary(dup_matched),
        "random": _count_summary(dup_random),
    }
    return Duplicates(summary, matched_ids, dup_matched, random_ids, dup_random)


def matched_train_ids(top: pa.Table, column: str, threshold: dict[str, Any], limit: int) -> np.ndarray:
    """(≤ limit,) int64: the distinct training images of the matched rows of ``top``; when there are more
    than ``limit``, those of the highest ``column`` first."""
    matched = _matched(top, column, threshold)
    ids = np.unique(matched.column("train_id").to_numpy())
    if len(ids) <= limit:
        return ids
    order = pc.sort_indices(matched, [(column, "descending")])
    ranked = matched.take(order).column("train_id").to_numpy()
    _, first = np.unique(ranked, return_index=True)
    return ranked[np.sort(first)][:limit]


def _matched(top: pa.Table, column: str, threshold: dict[str, Any]) -> pa.Table:
    if "column" in threshold:
        return top.filter(pc.fill_null(top["is_copy"], False))
    return top.filter(pc.greater_equal(top[column], 0.5))


def _matched_rule(column: str, threshold: dict[str, Any]) -> str:
    if "column" in threshold:
        return f"is_copy: {threshold['column']} >= {threshold['value']:.4f} ({threshold.get('name')})"
    return f"{column} >= 0.5 (the run has no threshold)"


def _count_summary(counts: np.ndarray) -> dict[str, Any]:
    if len(counts) == 0:
        return {"images": 0, "mean": None, "median": None, "max": None, "with_duplicates": None}
    return {
        "images": int(len(counts)),
        "mean": float(counts.mean()),
        "median": float(np.median(counts)),
        "max": int(counts.max()),
        "with_duplicates": float((counts > 0).mean()),
    }
