"""Replication statistics as Somepalli et al. report them (METHODS.md §2), with confidence intervals.

Two distributions are compared: the top-1 similarity of each generation to the training set (gen→train)
and, for a sample of training images, the similarity to their nearest *other* training image
(train→train; Somepalli take the second-nearest because the nearest is the image itself). A rightward
shift of gen→train against train→train signals copying. For each: density histograms with 0.005-wide
bins on [0, 1], mean, std, 75/90/95th percentiles, and the fraction above each threshold with a
bootstrap 95 % interval.

The bootstrap of a fraction resamples the n values with replacement; the count above a threshold in a
resample is then exactly Binomial(n, p̂), so it is drawn as such (the same distribution, without the
(B, n) resample matrix: millions of generations cost nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

BIN_WIDTH = 0.005
PERCENTILES = (75, 90, 95)
BOOTSTRAP_MAX_VALUES = 200_000  # above this many values, the mean difference uses the normal interval


def histogram(values: np.ndarray, width: float = BIN_WIDTH) -> dict[str, Any]:
    """Density histogram of ``values`` on [0, 1] in ``width`` bins.

    Returns {"edges": (nbins+1,), "counts": (nbins,), "density": (nbins,), "below": int, "above": int};
    density integrates to the fraction of values inside [0, 1] (values outside are counted apart, so
    nothing disappears silently: whitened cosines can be negative). NaN values are not counted.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    nbins = int(round(1.0 / width))
    edges = np.linspace(0.0, 1.0, nbins + 1)
    counts, _ = np.histogram(values, bins=edges)
    n = max(len(values), 1)
    return {
        "edges": edges,
        "counts": counts.astype(np.int64),
        "density": counts / (n * width),
        "below": int((values < 0).sum()),
        "above": int((values > 1).sum()),
    }


def bootstrap_fraction(k: int, n: int, resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the fraction k/n (see the module docstring)."""
    if n == 0:
        return (float("nan"), float("nan"))
    draws = rng.binomial(n, k / n, size=resamples) / n
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return (float(lo), float(hi))


def describe(
    values: np.ndarray,
    thresholds: Iterable[float],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Summary of one distribution: n, mean, std, p75/p90/p95 and, per threshold, the fraction ≥ it.

    values: (n,) similarities; NaN (no match) is left out and counted as ``missing``.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n": int(len(finite)), "missing": int(len(values) - len(finite))}
    if len(finite) == 0:
        out.update({"mean": None, "std": None, **{f"p{p}": None for p in PERCENTILES}, "above": {}})
        return out
    out["mean"] = float(finite.mean())
    out["std"] = float(finite.std())
    for p, v in zip(PERCENTILES, np.percentile(finite, PERCENTILES), strict=True):
        out[f"p{p}"] = float(v)
    above = {}
    for t in sorted(set(float(t) for t in thresholds)):
        k = int((finite >= t).sum())
        lo, hi = bootstrap_fraction(k, len(finite), resamples, rng)
        above[f"{t:g}"] = {"threshold": t, "count": k, "fraction": k / len(finite), "ci95": [lo, hi]}
    out["above"] = above
    return out


def shift(gen: np.ndarray, train: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Difference of means gen→train − train→train with a bootstrap 95 % interval (two-sample)."""
    gen = np.asarray(gen, dtype=np.float64)
    train = np.asarray(train, dtype=np.float64)
    gen, train = gen[np.isfinite(gen)], train[np.isfinite(train)]
    if len(gen) == 0 or len(train) == 0:
        return {"mean_difference": None, "ci95": [None, None]}
    difference = float(gen.mean() - train.mean())
    if len(gen) + len(train) > BOOTSTRAP_MAX_VALUES:
        # (resamples × n) draws would cost minutes; at this n the mean is normal to many digits (CLT)
        se = float(np.sqrt(gen.var() / len(gen) + train.var() / len(train)))
        ci = [difference - 1.959964 * se, difference + 1.959964 * se]
        return {"mean_difference": difference, "ci95": ci, "method": "normal"}
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    block = max(1, int(4_000_000 // (len(gen) + len(train))))  # bounds the resample matrix to ~32 MB
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        g = gen[rng.integers(0, len(gen), size=(b, len(gen)))].mean(axis=1)
        t = train[rng.integers(0, len(train), size=(b, len(train)))].mean(axis=1)
        diffs[start : start + b] = g - t
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"mean_difference": difference, "ci95": [float(lo), float(hi)], "method": "bootstrap"}
