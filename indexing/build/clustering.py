"""Where the k-means of index training runs: faiss on the GPU, torch on the GPU, or faiss on the CPU.

Training an ``IVF{nlist},PQ{m}np`` index is two k-means: the coarse quantizer (``nlist`` centroids; at LAION
scale 262,144 of them over 10 M vectors, ~2.7 × 10¹⁶ FLOP: days of CPU, minutes of GPU) and the PQ codebooks
(``m`` × 256 centroids of ``d / m`` dimensions over 65,536 residuals: small). The coarse one is moved to a GPU
when the training task holds one:

- ``faiss-gpu``: faiss's own clustering with its assignment index on the GPUs (``clustering_index``), when
  the installed faiss has GPUs (``faiss.get_num_gpus() > 0``, the ``.[gpu]`` extra);
- ``torch``: otherwise, when torch sees a CUDA device, the same k-means in torch (``kmeans``): faiss's
  settings (``niter``, at most ``max_points_per_centroid`` points per centroid, spherical centroids for the
  inner-product metric), its centroids then added to the index's quantizer, so faiss's ``train`` finds the
  quantizer trained and only trains the PQ codebooks, on the CPU;
- ``cpu``: faiss's clustering on the CPU, as before.

Either way the result is a normal CPU faiss index, written to object storage like any other. ``kmeans``
also runs on the CPU (``device="cpu"``), which is how the torch path is tested where there is no GPU.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from copyscan.indexing.runtime.devices import compute_device, torch_device

logger = logging.getLogger("copyscan")

BLOCK = 65_536  # points assigned at once: bounds the (block, k) score matrix


def prepare_training(index: faiss.Index, xt: np.ndarray, seed: int, device: str) -> str:
    """Before ``index.train(xt)``: put its coarse k-means on ``device`` (``compute_device``'s answer).
    Returns what trained it. Indexes without an IVF quantizer to train are left as they are ("cpu")."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or ivf.quantizer.ntotal or device == "cpu":
        return "cpu"
    if device == "faiss-gpu":
        flat = (
            faiss.IndexFlatIP(ivf.d)
            if ivf.metric_type == faiss.METRIC_INNER_PRODUCT
            else faiss.IndexFlatL2(ivf.d)
        )
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
        return "faiss-gpu"
    device = torch_device()
    centroids = kmeans(
        xt,
        ivf.nlist,
        niter=ivf.cp.niter,
        spherical=bool(ivf.cp.spherical),
        seed=seed,
        max_points_per_centroid=ivf.cp.max_points_per_centroid,
        device=device,
    )
    ivf.quantizer.add(centroids)  # train() then sees a trained quantizer and trains only the codes
    return f"torch:{device}"


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 10,
    spherical: bool = False,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Lloyd's k-means of ``x`` (n, d) float32 in torch on ``device`` → (k, d) float32 centroids.

    As faiss's ``Clustering``: at most ``k · max_points_per_centroid`` points (a seeded sample), ``k`` distinct
    sample points to start, ``niter`` iterations of assign (nearest centroid by L2, or by inner product when
    ``spherical``, centroids then L2-normalised) and update; an empty centroid takes half the points of the
    largest one (a perturbed copy of it), so none is wasted."""
    import torch

    rng = np.random.default_rng(seed)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means of {k} centroids needs at least {k} points, got {n}")
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False))]
    xs = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
    centroids = xs[torch.as_tensor(rng.choice(len(xs), size=k, replace=False), device=device)].clone()
    for _ in range(niter):
        assign = _assign(xs, centroids, spherical)
        centroids = _update(xs, assign, centroids, spherical, rng)
    return centroids.cpu().numpy().astype(np.float32)


def _assign(xs, centroids, spherical: bool):
    """(n,) index of each point's centroid: the largest inner product (spherical) or the smallest L2."""
    return nearest(xs, centroids, 1, inner_product=spherical)[1][:, 0]


def nearest(xs, centroids, k: int, *, inner_product: bool, block: int = BLOCK):
    """The ``k`` nearest ``centroids`` (m, d) of each point of ``xs`` (n, d), torch tensors on one device,
    as a flat faiss index answers: (D, I) of shape (n, k), D the inner products (largest first) or the
    squared L2 distances (smallest first), ``block`` points at a time (bounds the (block, m) score matrix)."""
    import torch

    # argmin |x - c|² = argmax x·c - |c|²/2; the distance is then |x|² - 2 (x·c - |c|²/2)
    half_norms = 0.0 if inner_product else 0.5 * (centroids * centroids).sum(1)
    distances, labels = [], []
    for part in torch.split(xs, block):
        scores, idx = torch.topk(part @ centroids.T - half_norms, k, dim=1)
        if not inner_product:
            scores = ((part * part).sum(1, keepdim=True) - 2 * scores).clamp(min=0)
        distances.append(scores)
        labels.append(idx)
    return torch.cat(distances), torch.cat(labels)


def _update(xs, assign, centroids, spherical: bool, rng: np.random.Generator):
    """The mean of each centroid's points (normalised when spherical); empty ones split the largest."""
    import torch

    k, d = centroids.shape
    counts = torch.bincount(assign, minlength=k)
    sums = torch.zeros((k, d), dtype=xs.dtype, device=xs.device).index_add_(0, assign, xs)
    updated = sums / counts.clamp(min=1).unsqueeze(1).to(xs.dtype)
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        donor = int(torch.argmax(counts))
        noise = torch.as_tensor(rng.standard_normal(d).astype(np.float32) * 1e-4, device=xs.device)
        updated[empty] = updated[donor] + noise
        updated[donor] = updated[donor] - noise
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
    if spherical:
        updated = torch.nn.functional.normalize(updated, dim=1)
    return updated


def training_device(requested: str = "auto") -> str:
    """What trains the coarse quantizer in this process
    (``copyscan.indexing.runtime.devices.compute_device``)."""
    return compute_device(requested, "train_device")
