"""Replication statistics as Somepalli et al. report them (METHODS.md §2), with confidence intervals.

Two distributions are compared: the top-1 similarity of each generation to the training set (gen→train)
and, for a sample of training images, the similarity to their nearest *other* training image
(train→train; Somepalli take the second-nearest because the nearest is the image itself). A rightward
shift of gen→train against train→train signals copying. For each: density histograms with 0.005-wide
bins on [0, 1], mean, std, 75/90/95th percentiles, and the fraction above each threshold with a
Wilson 95 % interval; the difference of the means with a bootstrap 95 % interval.

A fraction's interval is Wilson's score interval, not a bootstrap: resampling k of n draws
Binomial(n, k/n), which never varies at k = 0 or k = n, so a bootstrap reports [0, 0] for "no copy
among 1,000 generations" while Wilson's [0, 0.38 %] says what 1,000 generations can rule out.
"""

from __future__ import annotations

import math
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


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95 % by default); (0, 1) when n = 0.

    The bounds are exactly 0 at k = 0 and exactly 1 at k = n (the formula gives them up to rounding), so
    the fraction always lies inside its interval.
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def describe(values: np.ndarray, thresholds: Iterable[float]) -> dict[str, Any]:
    """Summary of one distribution: n, mean, std, p75/p90/p95, the values outside [0, 1] (``below_0``,
    ``above_1``: the histograms do not bin them) and, per threshold, the fraction ≥ it with its Wilson
    95 % interval.

    values: (n,) similarities; NaN (no match) is left out and counted as ``missing``.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {
        "n": int(len(finite)),
        "missing": int(len(values) - len(finite)),
        "below_0": int((finite < 0).sum()),
        "above_1": int((finite > 1).sum()),
    }
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
        lo, hi = wilson_interval(k, len(finite))
        above[f"{t:g}"] = {
            "threshold": t,
            "count": k,
            "fraction": k / len(finite),
            "ci95": [lo, hi],
            "method": "wilson",
        }
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
