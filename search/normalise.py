"""Score normalisation at scan time: ``score_norm = score − β · background bias`` (METHODS.md §1).

The background is the index's own sample of database vectors (``background.npz``, whitened), so each
pair's bias leaves out the matched training image itself (``indexing.postprocess.pair_background_bias``).
Rankings are unchanged; scores of different queries become comparable, so one global threshold applies.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from indexing import layout, storage
from indexing.manifest import resolve
from indexing.postprocess import apply_whitening, pair_background_bias


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
    """Holds the background sample; ``__call__`` gives score_norm for merged results."""

    def __init__(
        self,
        index_url: str,
        manifest: dict[str, Any],
        beta: float = 1.0,
        storage_options: storage.StorageOptions | None = None,
        per_image: int = 1,
    ) -> None:
        spec = manifest["background"]
        data = storage.load_npz(resolve(index_url, spec["path"]), storage_options)
        # a region index (per_image > 1) leaves a hit's whole image out of its background, not just the
        # region: the image's other regions overlap the hit and would raise its own bias
        self.per_image = int(per_image)
        self.ids = self.image_of(data["ids"].astype(np.int64))
        xbg = np.ascontiguousarray(data["xb"], dtype=np.float32)
        self.index = faiss.IndexFlatIP(xbg.shape[1])
        self.index.add(xbg)
        self.first, self.last = (int(r) for r in spec["ranks"])
        self.beta = float(beta)
        self.whitening = load_whitening(index_url, manifest, storage_options)

    def image_of(self, ids: np.ndarray) -> np.ndarray:
        """Packed ids → the ids of their images (region ids ``shard << 32 | row · R + box`` → ``shard << 32 |
        row``); unchanged for a whole-image index; -1 stays -1."""
        return layout.image_ids(ids, self.per_image)

    def __call__(
        self, xq: np.ndarray, D: np.ndarray, I: np.ndarray, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """xq: (nq, d) raw query descriptors; D, I: (nq, k) merged results → (nq, k) float32 score_norm.

        ``exclude`` (nq,) ids also left out of each query's background (calibration: the source of a copy,
        to score it as if its source were not in the index). NaN where the background has too few vectors.
        """
        extra = 0 if exclude is None else 1
        # up to per_image background vectors belong to the hit's image (and to ``exclude``'s) and are skipped
        m = min(self.last + self.per_image * (1 + extra), self.index.ntotal)
        D_bg, pos = self.index.search(whiten(self.whitening, xq), m)
        I_bg = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        if exclude is not None:
            I_bg = np.where(I_bg == self.image_of(np.asarray(exclude, dtype=np.int64))[:, None], -1, I_bg)
        bias = pair_background_bias(D_bg, I_bg, self.image_of(I), (self.first, self.last))
        out = (D - self.beta * bias).astype(np.float32)
        out[I < 0] = np.nan
        return out
