"""Train once on a sample, fill index shards from embedding shards, write each shard atomically.

The trained (empty) index is written to ``trained.index``; each fill reads it, streams its group of
embedding shards one at a time (never all vectors in one process), adds them with packed
(shard, row) ids, writes ``shard-NNNNN.index`` (temp name, then move) and then its JSON marker.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np

from copyscan.indexing.build.clustering import prepare_training, training_device
from copyscan.indexing.build.postprocess import (
    apply_whitening,
    fit_learned_whitening,
    fit_whitening,
    pair_background_bias,
    whiten_with_norms,
)
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage

ADD_BATCH = 65_536

logger = logging.getLogger("copyscan")


def sample_training_vectors(
    out: str,
    counts: Mapping[int, int],
    size: int,
    seed: int = 0,
    storage_options: storage.StorageOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of ~``size`` stored vectors: ((n, d) float32, (n,) int64 packed ids), reading few shards.

    Shards are visited in a seeded random order and each contributes a random subset of up to
    ``per_shard`` rows, ``per_shard`` chosen so that about 4× fewer shards than all are read when the
    collection is large; memory stays O(size · d).
    """
    rng = np.random.default_rng(seed)
    shards = [s for s in sorted(counts) if counts[s] > 0]
    if not shards:
        raise CopyscanError("no vectors to train on")
    total = sum(counts[s] for s in shards)
    size = max(1, min(size, total))  # a flat index needs one vector, for its dimension
    per_shard = max(1, -(-size * 4 // len(shards)))
    parts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    taken = 0
    for shard in rng.permutation(shards):
        if taken >= size:
            break
        xb = storage.load_npy(layout.emb_url(out, int(shard)), storage_options, mmap=True)
        want = min(per_shard, xb.shape[0], size - taken)
        rows = np.sort(rng.choice(xb.shape[0], size=want, replace=False))
        parts.append(np.asarray(xb[rows], dtype=np.float32))
        ids.append(layout.pack_ids(int(shard), rows))
        taken += want
    return np.concatenate(parts), np.concatenate(ids)


MIN_PAIRS = 16  # fewer pairs than this cannot say anything about how copies move


def load_pairs(
    out: str, shards: Sequence[int], storage_options: storage.StorageOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every stored (vector, augmented-copy vector) pair of ``shards``: two (m, d) float32 arrays."""
    xs, xa = [], []
    for shard in shards:
        url = layout.pairs_url(out, int(shard))
        if not storage.exists(url, storage_options):
            continue
        pairs = storage.load_npz(url, storage_options)
        xb = storage.load_npy(layout.emb_url(out, int(shard)), storage_options, mmap=True)
        xs.append(np.asarray(xb[pairs["rows"]], dtype=np.float32))
        xa.append(pairs["x"].astype(np.float32))
    if not xs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(xs), np.concatenate(xa)


def train_phase(
    out: str,
    factory: str,
    counts: Mapping[int, int],
    *,
    train_size: int,
    whitening: str = "learned",
    whitening_shrinkage: float = 0.1,
    whitening_pca_shrinkage: float | None = 0.3,
    whitening_sample: int = 100_000,
    background_size: int = 10_000,
    seed: int = 0,
    storage_options: storage.StorageOptions | None = None,
    whitening_from: str | None = None,
    train_device: str = "auto",
) -> dict[str, Any]:
    """Learn everything the index needs from one sample of its vectors, and write it.

    ``whitening_from`` (the URL of another index's ``whitening.npz``) takes that whitening instead of
    learning one: the region index uses its index's, learned from whole images and their copies, because
    its query windows are crops, i.e. images.

    Writes ``whitening.npz`` (``whitening="learned"``: learned from the (vector, augmented copy) pairs the
    embedding phase stored, then ``whitening_pca_shrinkage`` PCA-whitening of the result, falling back to
    PCA alone when there are no pairs; ``"pca"``: shrunk PCA-whitening of the
    sample; see indexing/build/postprocess.py),
    ``background.npz`` (``background_size`` whitened sample vectors with their ids, for score
    normalisation), ``train.json`` (what was used, also returned) and, last, ``trained.index`` (trained on
    the whitened sample, its coarse k-means on ``train_device``: ``copyscan.indexing.build.clustering``): its
    presence means the phase is complete.
    """
    if whitening not in ("learned", "pca", "none"):
        raise CopyscanError(f"whitening must be 'learned', 'pca' or 'none', not {whitening!r}")
    need = max(train_size, background_size, whitening_sample if whitening != "none" else 0, 1)
    xs, ids = sample_training_vectors(out, counts, need, seed, storage_options)
    # A new id for every training: everything built on this trained index shares it, so that scans and caches
    # can tell a rebuilt index at the same URL from the one they saw (a resumed build keeps it).
    info: dict[str, Any] = {"build_id": uuid.uuid4().hex, "sample_vectors": int(len(xs))}
    params = _whitening(
        out,
        sorted(counts),
        xs[:whitening_sample],
        whitening,
        whitening_from,
        whitening_shrinkage,
        whitening_pca_shrinkage,
        info,
        storage_options,
    )
    if params is not None:
        storage.save_npz(layout.whitening_url(out, factory), storage_options, **params)
        info["whitening_fit_vectors"] = int(min(len(xs), whitening_sample))
    xw = apply_whitening(params, xs) if params is not None else xs
    info["background_vectors"] = _write_background(
        layout.background_url(out, factory), xw, ids, background_size, seed, storage_options
    )
    index = train_index(factory, xw[: max(train_size, 1)], seed, train_device, info)
    info["train_vectors"] = int(min(len(xw), max(train_size, 1)))
    storage.write_json(layout.train_info_url(out, factory), info, storage_options)
    write_index(index, layout.trained_index_url(out, factory), storage_options)
    return info


def _whitening(
    out: str,
    shards: Sequence[int],
    xs: np.ndarray,
    whitening: str,
    whitening_from: str | None,
    shrinkage: float,
    pca_shrinkage: float | None,
    info: dict[str, Any],
    storage_options: storage.StorageOptions | None,
) -> dict[str, np.ndarray] | None:
    """The whitening parameters (None for ``"none"``): read from ``whitening_from``, or fit on the sample
    ``xs`` (n, d) float32. ``"learned"`` reads the stored (vector, augmented copy) pairs of ``shards`` and
    falls back to ``"pca"`` with fewer than MIN_PAIRS. What was done is noted in ``info``."""
    if whitening_from is not None and whitening != "none":
        params = dict(storage.load_npz(whitening_from, storage_options))
        info["whitening_from"] = whitening_from
        whitening = "from-index"
    elif whitening == "learned":
        x_pair, x_aug = load_pairs(out, shards, storage_options)
        if len(x_pair) >= MIN_PAIRS:
            params = fit_learned_whitening(
                x_pair, x_aug, xs, shrinkage=shrinkage, pca_shrinkage=pca_shrinkage
            )
            info["whitening_pairs"] = int(len(x_pair))
        else:
            # Shards embedded without pairs (whitening_pair_images=0), or a tiny collection: say so, use PCA.
            logger.warning(
                "train: %d augmented pair(s) stored (< %d); learned whitening falls back to PCA-whitening",
                len(x_pair),
                MIN_PAIRS,
            )
            info["whitening_fallback"] = f"{len(x_pair)} pairs < {MIN_PAIRS}: PCA-whitening"
            whitening = "pca"
            params = fit_whitening(xs, shrinkage=shrinkage)
    elif whitening == "pca":
        params = fit_whitening(xs, shrinkage=shrinkage)
    else:
        return None
    info["whitening_method"] = whitening
    info["whitening_stages"] = 2 if "proj2" in params else 1
    return params


def _write_background(
    url: str,
    xw: np.ndarray,
    ids: np.ndarray,
    size: int,
    seed: int,
    storage_options: storage.StorageOptions | None,
) -> int:
    """A seeded subset of ``size`` whitened sample vectors (float16) and their ids; returns how many."""
    order = np.random.default_rng(seed + 1).permutation(len(xw))[:size]
    order.sort()
    storage.save_npz(url, storage_options, ids=ids[order], xb=xw[order].astype(np.float16))
    return int(len(order))


def train_index(
    factory: str, xt: np.ndarray, seed: int = 0, device: str = "auto", info: dict[str, Any] | None = None
) -> faiss.Index:
    """Create ``factory`` (inner-product metric) and train it on ``xt`` (n, d) float32, its coarse k-means on
    ``device`` (``copyscan.indexing.build.clustering``: auto = faiss-gpu, torch on CUDA, or the CPU); what
    trained it goes into ``info["train_device"]``."""
    d = xt.shape[1]
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CopyscanError(f"faiss cannot build index_factory {factory!r} for d={d}: {exc}") from None
    _seed_clustering(index, seed)
    if not index.is_trained:
        xt = np.ascontiguousarray(xt, dtype=np.float32)
        trained_by = prepare_training(index, xt, seed, training_device(device))
        index.train(xt)
        if info is not None:
            info["train_device"] = trained_by
    return index


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed


def write_index(index: faiss.Index, url: str, storage_options: storage.StorageOptions | None = None) -> int:
    """Serialize ``index`` to ``url`` (via a local temp file, then an atomic move). Returns its size."""
    with storage.local_scratch() as tmp:
        local = os.path.join(tmp, "index")
        faiss.write_index(index, local)
        size = os.path.getsize(local)
        storage.upload_file(local, url, storage_options)
    return size


def read_index(url: str, storage_options: storage.StorageOptions | None = None) -> faiss.Index:
    if storage.is_local(url):
        return faiss.read_index(storage.local_path(url))
    with storage.local_scratch() as tmp:
        local = os.path.join(tmp, "index")
        storage.download_file(url, local, storage_options)
        return faiss.read_index(local)


def fill_index_shard(
    out: str,
    factory: str,
    index_shard: int,
    emb_shards: Sequence[int],
    whitening: bool,
    storage_options: storage.StorageOptions | None = None,
    density_per_image: int = 0,
) -> dict[str, Any]:
    """Add the vectors of ``emb_shards`` (whitened when ``whitening``) to a copy of the trained index and
    write index shard ``index_shard``. Returns the marker dict (also written, last, to ``shard-NNNNN.json``).

    ``density_per_image`` (a region index: its regions per image) also writes every vector's density
    (``region_density``) to ``layout.density_url``.
    """
    t0 = time.perf_counter()
    index = read_index(layout.trained_index_url(out, factory), storage_options)
    params = storage.load_npz(layout.whitening_url(out, factory), storage_options) if whitening else None
    background = None
    if density_per_image:
        url = layout.background_url(out, factory)
        background = BackgroundSample(url, DENSITY_RANKS, density_per_image, storage_options)
    counts: dict[str, int] = {}
    density_sum, density_count = 0.0, 0
    for shard in emb_shards:
        n, density = _add_embedding_shard(index, out, factory, shard, params, background, storage_options)
        if density is not None:
            density_sum += float(np.nansum(density, dtype=np.float64))
            density_count += int(np.isfinite(density).sum())
        counts[str(shard)] = n
    size = write_index(index, layout.index_shard_url(out, factory, index_shard), storage_options)
    marker = {
        "index_shard": index_shard,
        "factory": factory,
        "url": layout.index_shard_url(out, factory, index_shard),
        "ntotal": int(index.ntotal),
        "embedding_shards": [int(s) for s in emb_shards],
        "counts": counts,
        "norms": params is not None,  # whitening norms of every embedding shard written (re-ranking)
        "density": background is not None,  # region densities of every embedding shard written
        "density_sum": density_sum,
        "density_count": density_count,
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(layout.index_shard_marker_url(out, factory, index_shard), marker, storage_options)
    return marker


def _add_embedding_shard(
    index: faiss.Index,
    out: str,
    factory: str,
    shard: int,
    params: Mapping[str, np.ndarray] | None,
    background: BackgroundSample | None,
    storage_options: storage.StorageOptions | None,
) -> tuple[int, np.ndarray | None]:
    """Add embedding shard ``shard``'s vectors (whitened with ``params``) to ``index``, ADD_BATCH at a time,
    with packed (shard, row) ids; write its whitening norms ((n, stages) float32) with ``params`` and its
    region densities ((n,) float32) with ``background``. Returns (n, the densities or None)."""
    xb = storage.load_npy(layout.emb_url(out, shard), storage_options, mmap=True)
    n = xb.shape[0]
    norms, density = [], []
    for start in range(0, n, ADD_BATCH):
        chunk = np.ascontiguousarray(xb[start : start + ADD_BATCH], dtype=np.float32)
        if params is not None:
            chunk, chunk_norms = whiten_with_norms(params, chunk)
            norms.append(chunk_norms)
        ids = layout.pack_ids(shard, np.arange(start, start + chunk.shape[0]))
        index.add_with_ids(chunk, ids)
        if background is not None:
            density.append(background.bias(chunk, ids[:, None])[:, 0])  # the vector's own image left out
    if params is not None:
        stages = 2 if "proj2" in params else 1
        table = np.concatenate(norms) if norms else np.zeros((0, stages), np.float32)
        storage.save_npy(layout.norms_url(out, factory, shard), table, storage_options)
    if background is None:
        return int(n), None
    values = np.concatenate(density) if density else np.zeros(0, np.float32)
    storage.save_npy(layout.density_url(out, factory, shard), values, storage_options)
    return int(n), values


# The region density of a region vector is the mean cosine (in the index's space) of its DENSITY_RANKS
# nearest vectors of the index's background sample that belong to other images.
DENSITY_RANKS = (1, 3)


class BackgroundSample:
    """An index's background sample (``background.npz``: vectors already in the index's space, and their
    ids) as a flat index. ``bias`` gives (vector, hit) pairs their background bias with the hit's whole
    image left out: ``per_image`` > 1 is a region index, whose other boxes of the hit's image overlap it.
    Score normalisation (``copyscan.search.ann.normalise``) and region densities both use it."""

    def __init__(
        self,
        url: str,
        ranks: Sequence[int],
        per_image: int = 1,
        storage_options: storage.StorageOptions | None = None,
    ) -> None:
        data = storage.load_npz(url, storage_options)
        self.per_image = int(per_image)
        self.ids = layout.image_ids(data["ids"].astype(np.int64), self.per_image)
        xb = np.ascontiguousarray(data["xb"], dtype=np.float32)
        self.index = faiss.IndexFlatIP(int(xb.shape[1]))
        self.index.add(xb)
        self.ranks = (int(ranks[0]), int(ranks[1]))

    def bias(self, xw: np.ndarray, I: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """xw: (nq, d) in the index's space; I: (nq, k) packed ids of each one's hits → (nq, k) float32: the
        mean cosine of the ranks[0]-th..ranks[1]-th nearest background vectors of other images than the
        hit's (and than ``exclude``'s: (nq,) ids); NaN where too few remain."""
        extra = 0 if exclude is None else 1
        # up to per_image background vectors belong to the hit's image (and to ``exclude``'s) and are skipped
        m = min(self.ranks[1] + self.per_image * (1 + extra), self.index.ntotal)
        D_bg, pos = self.index.search(np.ascontiguousarray(xw, dtype=np.float32), m)
        I_bg = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        if exclude is not None:
            left_out = layout.image_ids(np.asarray(exclude, dtype=np.int64), self.per_image)
            I_bg = np.where(I_bg == left_out[:, None], -1, I_bg)
        return pair_background_bias(D_bg, I_bg, layout.image_ids(I, self.per_image), self.ranks)

    def floor(self, xw: np.ndarray) -> np.ndarray:
        """(nq,) float32: the lowest ``bias`` any hit can give query ``xw[i]``, the one of a hit that is the
        nearest background vector (leaving it out shifts every later rank up the most); NaN where too few.
        A lower bound of score normalisation for range search (``copyscan.search.ann.radius``); a global index
        only (``per_image`` 1): one region image holds several background vectors."""
        if self.per_image != 1:
            raise ValueError("floor is defined for a global index (per_image 1)")
        m = min(self.ranks[1] + 1, self.index.ntotal)
        D_bg, pos = self.index.search(np.ascontiguousarray(xw, dtype=np.float32), m)
        I_bg = np.where(pos >= 0, self.ids[np.maximum(pos, 0)], -1)
        return pair_background_bias(D_bg, I_bg, I_bg[:, :1], self.ranks)[:, 0]


def index_shard_marker(
    out: str, factory: str, index_shard: int, storage_options: storage.StorageOptions | None = None
) -> dict[str, Any] | None:
    url = layout.index_shard_marker_url(out, factory, index_shard)
    if not storage.exists(url, storage_options):
        return None
    return storage.read_json(url, storage_options)
