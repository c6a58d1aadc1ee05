"""Score normalisation at scan time: ``score_norm = score − β · background bias`` (METHODS.md §1).

The background is the index's own sample of database vectors (``background.npz``, whitened), so each
pair's bias leaves out the matched training image itself (``copyscan.indexing.build.ivf.BackgroundSample``).
Rankings are unchanged; scores of different queries become comparable, so one global threshold applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from copyscan.indexing.build.ivf import BackgroundSample
from copyscan.indexing.build.postprocess import apply_whitening
from copyscan.indexing.store import storage
from copyscan.indexing.store.manifest import resolve


def load_whitening(
    index_url: str, manifest: dict[str, Any], storage_options: storage.StorageOptions | None = None
) -> dict[str, np.ndarray] | None:
    """The index's whitening parameters ({"mean", "proj"}), or None when it has none."""
    spec = manifest.get("whitening")
    if not spec:
        return None
    return storage.load_npz(resolve(index_url, spec["path"]), storage_options)


def whiten(params: dict[str, np.ndarray] | None, x: np.ndarray) -> np.ndarray:
    """x: (n, d) raw unit descriptors → the index's space (whitened + L2-normalised, or unchanged)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return apply_whitening(params, x) if params is not None else x


class ScoreNormaliser:
    """Holds the background sample; ``__call__`` gives score_norm for merged results. ``per_image`` > 1 (a
    region index) leaves a hit's whole image out of its background, not just the region
    (``copyscan.indexing.build.ivf.BackgroundSample``)."""

    def __init__(
        self,
        index_url: str,
        manifest: dict[str, Any],
        beta: float = 1.0,
        storage_options: storage.StorageOptions | None = None,
        per_image: int = 1,
    ) -> None:
        spec = manifest["background"]
        self.sample = BackgroundSample(
            resolve(index_url, spec["path"]), spec["ranks"], per_image, storage_options
        )
        self.beta = float(beta)
        self.whitening = load_whitening(index_url, manifest, storage_options)

    def __call__(
        self, xq: np.ndarray, D: np.ndarray, I: np.ndarray, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """xq: (nq, d) raw query descriptors; D, I: (nq, k) merged results → (nq, k) float32 score_norm.

        ``exclude`` (nq,) ids also left out of each query's background (calibration: the source of a copy,
        to score it as if its source were not in the index). NaN where the background has too few vectors.
        """
        bias = self.sample.bias(whiten(self.whitening, xq), I, exclude)
        out = (D - self.beta * bias).astype(np.float32)
        out[I < 0] = np.nan
        return out

    def floor(self, xq: np.ndarray) -> np.ndarray:
        """xq: (nq, d) raw query descriptors → (nq,) float32, the lowest β · bias any training image can get
        against each (``BackgroundSample.floor``): score_norm >= t needs score >= t + floor."""
        return (self.beta * self.sample.floor(whiten(self.whitening, xq))).astype(np.float32)
