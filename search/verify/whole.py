"""Whole-copy verification: a generation's best global matches re-ranked by dense matching of feature maps.

A generation that copies a whole training image is, at worst, a 60–90 % crop of it, rotated a little,
recoloured, rescaled, JPEG'd and overlaid with text. One pooled descriptor per image cannot tell such a copy of
a grey dialog or a flat icon from the many images that look like it (README "Evaluation", per domain), but the
copy's cells still sit where the training image's do. This stage checks the global search's top candidates
cell by cell, the other way round from partial copies' dense verification (``copyscan.search.verify.dense``,
which slides a training image over a generation):

- the generation is run through EfficientNet-Lite0 up to block 10 (stride 16, 112 channels) with its shorter
  side at ``query_side`` px, each training candidate with its shorter side at ``train_side`` px (longer sides
  capped at twice those); every cell is L2-normalised;
- for each fraction f of ``fractions`` (0.55–0.95), the generation's map is resampled so that it spans f of the
  candidate's map on its tighter axis (a crop of 60–90 % of each side) and slid over it: the mean cosine of
  aligned cells at every offset; ``verify_peak`` is the highest over offsets and fractions;
- the peak of any pair of images is high (cells of a CNN map are all positively correlated, and flat icons
  or grey dialogs share most of theirs), so it is read against the generation's other candidates:
  ``verify_score = score_norm + weight * (verify_peak - mean of the BACKGROUND highest peaks of the
  generation's other verified candidates)``, the global score normalisation plus how far this candidate's
  peak stands above its neighbours' in the index; ``verify_rank`` orders a generation's verified candidates
  by ``verify_score`` (0 = its answer).

Both need at least one other verified candidate (null otherwise); ``verify_whole_error`` says why a selected
row was not verified. Cost per generation: one forward pass of the generation and one per candidate (at
``train_side`` px), and the correlations (``len(fractions)`` per pair, small).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.store import storage
from copyscan.search.results.matches import with_columns
from copyscan.search.verify.dense import STRIDE, DenseMatcher, DenseSpec, _DenseRun
from copyscan.search.verify.matches import Request, count_reasons, seconds

DEFAULT_FRACTIONS = (0.55, 0.62, 0.7, 0.78, 0.87, 0.95)
BACKGROUND = 3  # other candidates whose peaks make a generation's background


@dataclass(frozen=True)
class WholeSpec:
    """Verify each generation's global matches of ``rank < ranks``; ``weight`` scales the peak's margin over
    the background into ``verify_score``; ``weights``: EfficientNet-Lite0 state dict (None = the packaged one)."""

    ranks: int = 10
    weight: float = 2.0
    query_side: int = 224
    train_side: int = 320
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    weights: str | None = None
    threads: int = 8
    limits: DecodeLimits = DecodeLimits()
    fetch_pairs: int = 512  # pairs whose images are fetched and held at once (whole generations)

    def query_map(self, matcher: DenseMatcher, img: Image.Image) -> torch.Tensor:
        """A generation's block-10 map as verification reads it (the calibration's copies too)."""
        return matcher.feature_map(img, self.query_side, max_side=2 * self.query_side)

    def train_map(self, matcher: DenseMatcher, img: Image.Image) -> torch.Tensor:
        """A candidate training image's block-10 map, the larger one the generation's is slid over."""
        return matcher.feature_map(img, self.train_side, max_side=2 * self.train_side)

    def problems(self) -> list[str]:
        out = []
        if self.ranks == 1 or self.ranks < 0:
            out.append("verify_whole must be 0 (off) or >= 2 (a candidate is read against the others)")
        if self.weight <= 0:
            out.append("verify_whole_weight must be positive")
        if min(self.query_side, self.train_side) < STRIDE * 4:
            out.append(f"whole-copy verification sides must be >= {STRIDE * 4} px")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            out.append("whole-copy verification fractions must be in (0, 1]")
        return out


def peak(query: torch.Tensor, train: torch.Tensor, fractions: tuple[float, ...]) -> float | None:
    """The highest mean cosine of aligned cells of ``query`` (a generation's (c, hq, wq) map of unit cells),
    resampled to span each fraction of ``fractions`` of ``train`` ((c, ht, wt)) on its tighter axis, over
    every offset where it fits; None when it fits nowhere."""
    _, hq, wq = query.shape
    _, ht, wt = train.shape
    best: float | None = None
    for f in fractions:
        scale = f / max(wq / wt, hq / ht)
        h, w = max(1, round(hq * scale)), max(1, round(wq * scale))
        if h > ht or w > wt:
            continue
        template = F.interpolate(query[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        template = F.normalize(template, dim=0)
        value = float(F.conv2d(train[None], template[None]).max()) / (h * w)
        best = value if best is None else max(best, value)
    return best


def whole_scores(
    query_ids: list[Any], score_norm: np.ndarray, peaks: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(verify_score, verify_rank)`` of each row from its generation's (same ``query_ids`` entry) peaks
    (module docstring). ``score_norm``, ``peaks``: (n,) float32, NaN where unknown / not verified. Returns
    (n,) float32 scores (NaN where a row has no peak or no other verified row in its generation) and (n,)
    int32 ranks by score within the generation, 0 = highest, ties in the table's order, -1 where unscored."""
    score = np.full(len(peaks), np.nan, dtype=np.float32)
    rank = np.full(len(peaks), -1, dtype=np.int32)
    by_query: dict[Any, list[int]] = defaultdict(list)
    for r in np.nonzero(np.isfinite(peaks))[0].tolist():
        by_query[query_ids[r]].append(r)
    for rows in by_query.values():
        if len(rows) < 2:
            continue
        values = peaks[rows].astype(np.float64)
        for i, r in enumerate(rows):
            others = np.sort(np.delete(values, i))[::-1][:BACKGROUND]
            score[r] = score_norm[r] + weight * (values[i] - others.mean())
        scored = [r for r in rows if np.isfinite(score[r])]
        order = sorted(scored, key=lambda r: (-float(score[r]), r))
        rank[order] = np.arange(len(order), dtype=np.int32)
    return score, rank


def verify_whole(
    table: pa.Table,
    manifest: dict[str, Any],
    index_url: str,
    spec: WholeSpec,
    storage_options: storage.StorageOptions | None = None,
    matcher: DenseMatcher | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Verify the global matches of ``rank < spec.ranks`` in ``table`` (MATCHES_SCHEMA columns).

    Images are fetched and decoded for at most ``spec.fetch_pairs`` pairs (whole generations) at a time.
    Returns the table with ``verify_rank``, ``verify_peak``, ``verify_score`` and ``verify_whole_error`` set
    (null where not verified), and counts: ``whole_pairs`` (selected), ``whole_verified``, ``whole_no_fit``,
    ``whole_errors`` ({reason: count}), ``whole_error_examples`` and ``whole_seconds``.
    """
    t0 = time.perf_counter()
    rank = np.asarray(table["rank"].to_numpy(zero_copy_only=False), dtype=np.float64)
    rows = np.nonzero(rank < spec.ranks)[0]  # NaN (found only by region matching) is never selected
    run = _WholeRun(table.num_rows, spec)
    if len(rows):
        run.measure(table, rows, manifest, index_url, storage_options, matcher or whole_matcher(spec))
    score_norm = np.asarray(table["score_norm"].to_numpy(zero_copy_only=False), dtype=np.float32)
    score, verify_rank = whole_scores(table["query_id"].to_pylist(), score_norm, run.z, spec.weight)
    done = np.isfinite(run.z)
    table = with_columns(
        table,
        {
            "verify_rank": pa.array(verify_rank, pa.int32(), mask=verify_rank < 0),
            "verify_peak": pa.array(run.z, pa.float32(), mask=~done),
            "verify_score": pa.array(score, pa.float32(), mask=~np.isfinite(score)),
            "verify_whole_error": pa.array(run.failures.errors, pa.string()),
        },
    )
    stats = {
        "whole_pairs": len(rows),
        "whole_verified": int(done.sum()),
        "whole_no_fit": run.no_fit,
        "whole_errors": count_reasons(run.failures.errors),
        "whole_error_examples": run.failures.examples,
        "whole_seconds": seconds(run.timings, t0),
    }
    return table, stats


def whole_matcher(spec: WholeSpec) -> DenseMatcher:
    """The feature maps of dense verification, with ``spec``'s network weights."""
    return DenseMatcher(DenseSpec(weights=spec.weights))


class _WholeRun(_DenseRun):
    """Dense verification's fetching and decoding (a group of whole generations at a time), with each
    generation's map matched against its candidates' maps: ``z`` holds the peaks."""

    def _match_query(
        self,
        matcher: DenseMatcher,
        query: Image.Image,
        pairs: list[int],
        decoded: dict[Request, Image.Image | tuple[str, str]],
        templates: dict[Request, torch.Tensor],
    ) -> None:
        """Match one generation's candidates ``pairs`` (rows); ``templates`` caches the candidates' maps."""
        spec: WholeSpec = self.spec  # type: ignore[assignment]
        query_map = spec.query_map(matcher, query)
        for r in pairs:
            train_req = self.train_req[r]
            train = decoded[train_req]
            if not isinstance(train, Image.Image):
                self.failures.add(r, f"train_{train[0]}", train[1], train_req, self.query_req[r])
                continue
            if train_req not in templates:
                templates[train_req] = spec.train_map(matcher, train)
            found = peak(query_map, templates[train_req], spec.fractions)
            if found is None:
                self.no_fit += 1
            else:
                self.z[r] = found
