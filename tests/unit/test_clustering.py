"""Index training's coarse k-means off the CPU faiss path: torch k-means (run here on the CPU, the same code a
CUDA device runs) and faiss's GPU clustering, compared with faiss's CPU k-means on seeded data."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from copyscan.indexing.build import clustering
from copyscan.indexing.build.ivf import train_index
from copyscan.indexing.runtime.devices import compute_device


def _blobs(n: int, d: int, centres: int, seed: int = 0, spread: float = 0.05) -> np.ndarray:
    """(n, d) float32 unit vectors around ``centres`` random unit directions."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, d)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = means[rng.integers(centres, size=n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Mean squared L2 distance of each point to its nearest centroid."""
    D, _ = faiss.knn(x, centroids, 1)
    return float(D.mean())


def test_torch_kmeans_matches_faiss_kmeans():
    x = _blobs(6_000, 32, centres=24)
    ours = clustering.kmeans(x, 24, niter=20, seed=1)
    theirs = faiss.Kmeans(32, 24, niter=20, seed=1)
    theirs.train(x)
    assert ours.shape == (24, 32) and ours.dtype == np.float32 and np.isfinite(ours).all()
    assert _inertia(x, ours) <= 1.10 * _inertia(x, theirs.centroids)
    spherical = clustering.kmeans(x, 24, niter=10, spherical=True, seed=1)
    np.testing.assert_allclose(np.linalg.norm(spherical, axis=1), 1.0, rtol=1e-5)


def test_torch_kmeans_samples_like_faiss_and_fills_empty_centroids():
    x = _blobs(2_000, 16, centres=4)
    x[:1_900] = x[0]  # most points identical: centroids started there would stay empty without the split
    centroids = clustering.kmeans(x, 16, niter=8, seed=3, max_points_per_centroid=100)
    assert np.isfinite(centroids).all() and len(np.unique(centroids.round(6), axis=0)) == 16
    with pytest.raises(ValueError, match="needs at least 16 points"):
        clustering.kmeans(x[:10], 16)


def test_ivf_trained_with_torch_kmeans_searches_like_the_faiss_cpu_one():
    """The same factory trained both ways: a normal faiss index whose recall against exact search matches."""
    xb = _blobs(20_000, 32, centres=200, seed=2, spread=0.2)
    xq = _blobs(500, 32, centres=200, seed=3, spread=0.2)
    _, exact = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    recalls, info = {}, {}
    for device in ("cpu", "torch"):
        info[device] = {}
        index = train_index("IVF128,PQ16np", xb[:8_000], seed=0, device=device, info=info[device])
        index.add(xb)
        faiss.extract_index_ivf(index).nprobe = 8
        _, found = index.search(xq, 10)
        recalls[device] = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert info["cpu"]["train_device"] == "cpu" and info["torch"]["train_device"] == "torch:cpu"
    assert recalls["torch"] >= recalls["cpu"] - 0.03 and recalls["torch"] > 0.4, recalls


def test_flat_indexes_and_the_auto_device_here():
    assert clustering.training_device("auto") == (
        "faiss-gpu" if faiss.get_num_gpus() else "torch" if torch.cuda.is_available() else "cpu"
    )
    info: dict = {}
    assert train_index("IDMap,Flat", _blobs(100, 8, 4), info=info).is_trained and info == {}
    with pytest.raises(ValueError, match="train_device must be one of"):
        clustering.training_device("tpu")
    with pytest.raises(ValueError, match="search_device must be one of"):
        compute_device("gpu", "search_device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: torch k-means ran on the CPU")
def test_torch_kmeans_on_the_gpu_matches_the_cpu():
    x = _blobs(20_000, 64, centres=100)
    gpu = clustering.kmeans(x, 100, niter=10, spherical=True, seed=5, device="cuda")
    cpu = clustering.kmeans(x, 100, niter=10, spherical=True, seed=5, device="cpu")
    assert abs(_inertia(x, gpu) - _inertia(x, cpu)) <= 0.02 * _inertia(x, cpu)


@pytest.mark.skipif(
    faiss.get_num_gpus() == 0, reason="the installed faiss has no GPU (faiss-cpu: the .[cpu] extra)"
)
def test_faiss_gpu_clustering_trains_a_cpu_index():
    info: dict = {}
    index = train_index("IVF64,PQ8np", _blobs(10_000, 32, 64), device="faiss-gpu", info=info)
    assert info["train_device"] == "faiss-gpu" and index.is_trained
    faiss.serialize_index(index)  # a normal CPU index: written to object storage like any other
