"""Index-level post-processing of descriptors: whitening learned on the database, score normalisation.

Pure numpy. The index build learns the whitening on a sample of its own vectors and applies it to every
vector it indexes; the scan applies it to queries and to the stored vectors it re-ranks, and subtracts
each query's background bias (METHODS.md §1, SSCD) to give ``score_norm``. Measured by
``bench/copy_eval.py``; the defaults are in ``indexing/index_config.py``.
"""

from __future__ import annotations

import numpy as np

from copyscan.indexing.errors import CopyscanError


def fit_whitening(xb: np.ndarray, shrinkage: float = 0.5, dim: int | None = None) -> dict[str, np.ndarray]:
    """Learn PCA-whitening on database vectors. xb: (n, d) float32 (unit vectors) → params.

    Covariance C of the centred vectors is shrunk towards a multiple of the identity,
    C' = (1 − shrinkage)·C + shrinkage·(tr C / d)·I, so that directions seen in few images are not blown up;
    ``dim`` keeps the leading components (default all). Returns {"mean": (d,), "proj": (d, k)} float32 with
    y = (x − mean) @ proj, to be L2-normalised (``apply_whitening`` does both).
    """
    xb = np.asarray(xb, dtype=np.float64)
    if xb.ndim != 2 or len(xb) < 2:
        raise CopyscanError(f"whitening needs at least 2 vectors of shape (n, d), got {xb.shape}")
    if not 0.0 <= shrinkage <= 1.0:
        raise CopyscanError(f"whitening shrinkage must be in [0, 1], got {shrinkage}")
    mean = xb.mean(0)
    centred = xb - mean
    cov = centred.T @ centred / len(xb)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    shrunk = (1.0 - shrinkage) * eigval + shrinkage * eigval.mean()
    keep = len(eigval) if dim is None else int(dim)
    floor = max(shrunk[0] * 1e-6, 1e-12)  # guards the zero-variance directions when shrinkage is 0
    proj = eigvec[:, :keep] / np.sqrt(np.maximum(shrunk[:keep], floor))
    return {"mean": mean.astype(np.float32), "proj": proj.astype(np.float32)}


def fit_learned_whitening(
    x: np.ndarray,
    x_aug: np.ndarray,
    xb: np.ndarray,
    shrinkage: float = 0.3,
    dim: int | None = None,
    pca_shrinkage: float | None = None,
) -> dict[str, np.ndarray]:
    """Whitening learned from matching pairs (Mikolajczyk & Matas 2007; Radenović et al. 2016).

    x: (n, d) float32 vectors of sample images; x_aug: (n, d) their ``copy_augment``-ed copies (row i of each is
    one pair; an image may appear in several pairs); xb: (m, d) database vectors (for the mean and the order of
    components). The covariance of the pair differences, shrunk like ``fit_whitening``, is whitened away
    (directions along which copies move are shrunk), then components are ordered by database variance;
    ``dim`` keeps the leading ones. Returns {"mean": (d,), "proj": (d, k)} float32 for ``apply_whitening``.

    Learn it from a sample of the database (or the background set) augmented at build time, not from the
    queries. Measured on images that are not themselves copied (bench/copy_eval.py, ``lwhite``).

    ``pca_shrinkage`` adds a second stage: ``fit_whitening`` of the database vectors *after* the first
    (returned as "mean2", "proj2", applied after the first stage's L2 normalisation). The first stage removes
    what copying changes; the second flattens the directions in which the database itself varies most
    (generic content shared by many images), which makes raw top-1 cosines comparable across queries
    (bench/copy_detection.py measured both).
    """
    x = np.asarray(x, dtype=np.float64)
    x_aug = np.asarray(x_aug, dtype=np.float64)
    if x.shape != x_aug.shape or x.ndim != 2 or len(x) < 2:
        raise CopyscanError(
            f"learned whitening needs two (n, d) arrays of pairs, got {x.shape} and {x_aug.shape}"
        )
    if not 0.0 <= shrinkage <= 1.0:
        raise CopyscanError(f"whitening shrinkage must be in [0, 1], got {shrinkage}")
    diff = x - x_aug
    eigval, eigvec = np.linalg.eigh(diff.T @ diff / len(diff))
    eigval = np.clip(eigval, 0.0, None)
    shrunk = (1.0 - shrinkage) * eigval + shrinkage * eigval.mean()
    w1 = eigvec / np.sqrt(np.maximum(shrunk, max(shrunk.max() * 1e-9, 1e-12)))
    xb = np.asarray(xb, dtype=np.float64)
    mean = xb.mean(0)
    y = (xb - mean) @ w1
    eigval2, rotation = np.linalg.eigh(y.T @ y / len(y))
    rotation = rotation[:, np.argsort(eigval2)[::-1]]
    keep = rotation.shape[1] if dim is None else int(dim)
    params = {"mean": mean.astype(np.float32), "proj": (w1 @ rotation[:, :keep]).astype(np.float32)}
    if pca_shrinkage is not None:
        second = fit_whitening(apply_whitening(params, xb), shrinkage=pca_shrinkage)
        params.update(mean2=second["mean"], proj2=second["proj"])
    return params


def apply_whitening(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """x: (n, d) float32 → (n, k) float32, whitened and L2-normalised (database, queries and background alike).

    With "mean2"/"proj2" in ``params`` (a two-stage whitening), the second stage follows the first's
    normalisation.
    """
    return whiten_with_norms(params, x)[0]


def whiten_with_norms(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``apply_whitening`` and the norm each stage divided by: (n, k) float32 and (n, stages) float32.

    The norms let re-ranking score a raw stored vector in the whitened space with one dot product
    (``whitened_score_terms``) instead of whitening it again (two d×d products per candidate).
    """
    y = (np.asarray(x, dtype=np.float32) - params["mean"]) @ params["proj"]
    n1 = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    y = (y / n1).astype(np.float32)
    if "proj2" not in params:
        return y, n1.astype(np.float32)
    y = (y - params["mean2"]) @ params["proj2"]
    n2 = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return (y / n2).astype(np.float32), np.concatenate([n1, n2], axis=1).astype(np.float32)


def whitened_score_terms(params: dict[str, np.ndarray], w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per whitened query w (nq, k): b (nq, d) and c (nq, stages) such that, for a raw vector x whose
    ``whiten_with_norms`` norms are (n1[, n2]), ⟨w, whiten(x)⟩ = ((x·b − c1) / n1 − c2) / n2.

    Both stages are affine maps followed by a division by a norm, so the whitened inner product unrolls
    into the query side (exact up to float rounding).
    """
    w = np.asarray(w, dtype=np.float32)
    if "proj2" in params:
        a = w @ params["proj2"].T  # (nq, k1): ⟨w, (u − μ2)·P2⟩ = ⟨u − μ2, a⟩
        c2 = a @ np.ravel(params["mean2"])
    else:
        a, c2 = w, None
    b = (a @ params["proj"].T).astype(np.float32)  # (nq, d): ⟨a, (x − μ1)·P1⟩ = ⟨x − μ1, b⟩
    c1 = b @ np.ravel(params["mean"])
    c = np.stack([c1, c2], axis=1) if c2 is not None else c1[:, None]
    return b, c.astype(np.float32)


def background_bias(xq: np.ndarray, xbg: np.ndarray, ranks: tuple[int, int] = (1, 3)) -> np.ndarray:
    """Mean similarity of each query to its ``ranks[0]``-th..``ranks[1]``-th nearest background vectors.

    xq: (nq, d) float32 unit vectors; xbg: (nb, d) float32 unit vectors, a held-aside sample of the database
    distribution (not the database itself). Returns (nq,) float32. Exact inner product, in blocks.
    """
    first, last = ranks
    if not 1 <= first <= last <= len(xbg):
        raise CopyscanError(f"background ranks {ranks} need 1 ≤ first ≤ last ≤ {len(xbg)} background vectors")
    out = np.empty(len(xq), dtype=np.float32)
    for start in range(0, len(xq), 4096):
        sims = np.asarray(xq[start : start + 4096], dtype=np.float32) @ np.asarray(xbg, dtype=np.float32).T
        top = -np.partition(-sims, last - 1, axis=1)[:, :last]
        top.sort(axis=1)
        out[start : start + len(sims)] = top[:, ::-1][:, first - 1 : last].mean(1)
    return out


def normalised_scores(D: np.ndarray, bias: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """Score normalisation (METHODS.md §1): D (nq, k) raw similarities, bias (nq,) → D − beta·bias[:, None].

    Rankings per query are unchanged; scores become comparable across queries, so one global threshold works.
    In an inner-product index the same is q' = [q, −beta·bias(q)], r' = [r, 1].
    """
    return (
        np.asarray(D, dtype=np.float32) - np.float32(beta) * np.asarray(bias, dtype=np.float32)[:, None]
    ).astype(np.float32)


def pair_background_bias(
    D_bg: np.ndarray, I_bg: np.ndarray, I: np.ndarray, ranks: tuple[int, int] = (1, 3)
) -> np.ndarray:
    """Background bias of every (query, result) pair, leaving the result itself out of its background.

    D_bg, I_bg: (nq, m) similarities/ids of each query's nearest background vectors, descending, with
    m ≥ ranks[1] + 1; I: (nq, k) result ids. The background is a sample of the database itself (so every
    training image stays findable); for the pair (q, r) the ranks[0]-th..ranks[1]-th nearest background
    vectors other than r are averaged. Returns (nq, k) float32; NaN where too few remain.
    """
    first, last = ranks
    out = np.full(I.shape, np.nan, dtype=np.float32)
    for j in range(I.shape[1]):
        keep = (I_bg != I[:, j : j + 1]) & (I_bg >= 0)
        rank = np.cumsum(keep, axis=1)  # 1-based rank among the kept neighbours
        chosen = keep & (rank >= first) & (rank <= last)
        count = chosen.sum(1)
        total = np.where(chosen, D_bg, 0.0).sum(1)
        out[:, j] = np.where(count == last - first + 1, total / np.maximum(count, 1), np.nan)
    return out
