"""Calibration negatives scored as unseen images: the index's whitening refit without the copied images.

A copy's best match other than its source stands in for what an image that copies nothing scores against the
index (``copyscan.search.calibrate.whole``). That stand-in is biased when the copied image itself helped fit
the index's whitening: the PCA stage of the whitening (``copyscan.indexing.build.postprocess``) learns the
directions in which the database varies, and with few vectors per dimension each fitted vector keeps a
direction of its own that the whitening stretches. Its copy then points away from every other training image,
so its best non-source match scores lower than an unseen image's best match does (README, Evaluation:
"Calibration per domain": on a 300-image index the copies' negatives sat 0.01–0.02 of ``score_norm`` below
the unseen images' best matches on every domain, and the p90 threshold promised precision it did not give).

An unseen image took no part in the fit, so the copies are split into folds and, for each, the whitening is
fit again as the index was, without that fold's sources. A fold leaves out at most ``share`` of the fitted
vectors: on a small index, a whitening fit without a fifth of them is another whitening, whose negatives run
as far above an unseen image's as the in-sample ones run below (a 60-image index: five folds of 8 put the
copies' negatives up to 0.31 of ``score_norm``, leaving one out at a time up to 0.09, the unseen images' best
matches up to 0.06). Each copy is searched in that space over every database vector except its source, and
its best match is score-normalised against the background sample whitened the same way, source left out. This is exact search over the whole database, so it runs
where it matters and is cheap: when every vector of the index was in the whitening's fit (``ntotal`` ≤
``whitening_sample``, 100,000 by default). An index fit on a sample of a larger collection is left as it is:
a sample of 100,000 vectors gives one image's own direction a negligible weight.
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from copyscan.indexing.build.ivf import load_pairs
from copyscan.indexing.build.postprocess import (
    apply_whitening,
    fit_learned_whitening,
    fit_whitening,
    pair_background_bias,
)
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import resolve
from copyscan.search.ann.normalise import load_whitening

logger = logging.getLogger("copyscan")

MAX_VECTORS = 200_000  # exact search over the whole database in memory: (n, d) float32 twice
# a refit on every vector must give the index's own whitening back (same cosines to this tolerance), or the
# refit is not the index's and the negatives stay in-sample
REPRODUCE_TOLERANCE = 1e-3


def held_out_reason(manifest: dict[str, Any]) -> str | None:
    """Why the negatives cannot (or need not) be held out of the whitening's fit, or None when they can."""
    spec = manifest.get("whitening") or {}
    if not spec or spec.get("from"):
        return "the index's whitening was not fit on its own vectors"
    fit = int(spec.get("fit_vectors") or 0)
    if fit < int(manifest["ntotal"]):
        return f"the whitening was fit on a sample of {fit} of {manifest['ntotal']} vectors"
    if int(manifest["ntotal"]) > MAX_VECTORS:
        return f"{manifest['ntotal']} vectors are more than the exact search here holds ({MAX_VECTORS})"
    return None


def _fit(manifest: dict[str, Any], xb: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> dict:
    """The index's whitening fit again on ``xb`` (n, d) float32, with the settings its manifest records."""
    spec = manifest["whitening"]
    if spec["kind"] == "learned" and not spec.get("fallback"):
        return fit_learned_whitening(
            pairs[0], pairs[1], xb, shrinkage=spec["shrinkage"], pca_shrinkage=spec.get("pca_shrinkage")
        )
    return fit_whitening(xb, shrinkage=spec["shrinkage"])


def database_vectors(
    index_url: str, manifest: dict[str, Any], storage_options: storage.StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every stored vector of the index, (n, d) float32 raw descriptors, and their (n,) int64 packed ids."""
    xs, ids = [], []
    for entry in manifest["embedding_shards"]:
        if entry["count"] == 0:
            continue
        xb = storage.load_npy(layout.emb_url(index_url, entry["shard"]), storage_options)
        xs.append(np.asarray(xb, dtype=np.float32))
        ids.append(layout.pack_ids(entry["shard"], np.arange(len(xb))))
    return np.concatenate(xs), np.concatenate(ids)


def other_columns(I: np.ndarray, sources: np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64 columns of ``I`` (n, m > k) holding each row's k best matches other than its source
    ``sources`` (n,), in their order (a stable sort moves the source, where found, last)."""
    return np.argsort(I == sources[:, None], axis=1, kind="stable")[:, :k]


def held_out_negatives(
    index_url: str,
    manifest: dict[str, Any],
    xq: np.ndarray,
    sources: np.ndarray,
    share: float,
    seed: int,
    storage_options: storage.StorageOptions | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """xq: (n, d) float32 raw descriptors of copies of the training images ``sources`` (n,) int64 packed ids
    → ((n,) score, (n,) score_norm, (n,) int64 packed id) of each copy's best match with its source held
    out of the whitening's fit, the search and the background (module docstring); None where
    ``held_out_reason`` says why not, or where the index's whitening cannot be fit again as it was (logged).
    ``share``: the most of the fitted vectors one refit leaves out (``fold_count``)."""
    hits = held_out_hits(index_url, manifest, xq, sources, share, seed, 1, storage_options)
    return None if hits is None else (hits[0][:, 0], hits[1][:, 0], hits[2][:, 0])


def held_out_hits(
    index_url: str,
    manifest: dict[str, Any],
    xq: np.ndarray,
    sources: np.ndarray,
    share: float,
    seed: int,
    k: int,
    storage_options: storage.StorageOptions | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``held_out_negatives`` for each copy's ``k`` best matches other than its source, best first (whole-copy
    verification reads a generation's candidates against each other): ((n, k) score, (n, k) score_norm,
    (n, k) int64 packed ids, -1 where the index has fewer than k others), or None as there."""
    reason = held_out_reason(manifest)
    if reason is not None:
        logger.info("calibrate: negatives scored in the index's whitening: %s", reason)
        return None
    xb, ids = database_vectors(index_url, manifest, storage_options)
    shards = [e["shard"] for e in manifest["embedding_shards"]]
    pairs = load_pairs(index_url, shards, storage_options)
    stored = load_whitening(index_url, manifest, storage_options)
    probe = xb[:: max(1, len(xb) // 64)]
    params = _fit(manifest, xb, pairs)
    refit = apply_whitening(params, probe) @ apply_whitening(params, xb).T
    given = apply_whitening(stored, probe) @ apply_whitening(stored, xb).T
    if float(np.abs(refit - given).max()) > REPRODUCE_TOLERANCE:
        logger.warning("calibrate: the index's whitening cannot be fit again as it was; negatives in-sample")
        return None
    background = storage.load_npz(resolve(index_url, manifest["background"]["path"]), storage_options)
    row_of = {int(i): r for r, i in enumerate(ids)}
    bg_rows = np.array([row_of[int(i)] for i in background["ids"]], dtype=np.int64)
    ranks = tuple(int(r) for r in manifest["background"]["ranks"])
    source_rows = np.array([row_of[int(i)] for i in sources], dtype=np.int64)
    distinct = np.unique(source_rows)
    folds = fold_count(len(distinct), len(xb), share)
    order = np.random.default_rng(seed).permutation(len(distinct))
    fold_of_source = dict(zip(distinct[order].tolist(), np.arange(len(distinct)) % folds, strict=True))
    fold_of = np.array([fold_of_source[int(r)] for r in source_rows], dtype=np.int64)
    k = min(k, len(xb) - 1)
    D_out = np.full((len(xq), k), np.nan, dtype=np.float32)
    norm_out = np.full((len(xq), k), np.nan, dtype=np.float32)
    hit_out = np.full((len(xq), k), -1, dtype=np.int64)
    for fold in np.unique(fold_of):
        sel = np.nonzero(fold_of == fold)[0]
        keep = np.ones(len(xb), dtype=bool)
        keep[source_rows[sel]] = False
        params = _fit(manifest, xb[keep], pairs)
        wb, wq = apply_whitening(params, xb), apply_whitening(params, xq[sel])
        D, I = _flat(wb).search(wq, k + 1)
        other = other_columns(I, source_rows[sel], k)
        D_hit, I_hit = np.take_along_axis(D, other, 1), np.take_along_axis(I, other, 1)
        m = min(ranks[1] + 2, len(bg_rows))
        D_bg, pos = _flat(wb[bg_rows]).search(wq, m)
        I_bg = np.where(pos >= 0, bg_rows[np.maximum(pos, 0)], -1)
        I_bg = np.where(I_bg == source_rows[sel][:, None], -1, I_bg)
        bias = pair_background_bias(D_bg, I_bg, I_hit, ranks)
        D_out[sel] = D_hit
        norm_out[sel] = D_hit - bias
        hit_out[sel] = ids[I_hit]
    return D_out, norm_out, hit_out


def fold_count(sources: int, fitted: int, share: float) -> int:
    """Folds of ``sources`` distinct copied images such that none leaves out more than ``share`` of the
    ``fitted`` vectors (at least one image a fold: leave-one-out on a small index)."""
    per_fold = max(1, int(share * fitted))
    return max(1, -(-sources // per_fold))


def _flat(x: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(int(x.shape[1]))
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index
