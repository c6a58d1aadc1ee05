"""One coarse quantisation per query block for all the IVF index shards of one trained index.

Every index shard is filled from the same ``trained.index``, so all hold the same transforms (OPQ) and the
same coarse quantizer. Searching each shard with ``index.search`` would transform and quantize every query
block once per shard (at LAION scale, 262,144 centroids × 512 dimensions: most of a query's cost); here
the block is transformed and quantized once, and each shard's inverted lists are scanned with
``search_preassigned`` on those lists: the same results as searching each shard on its own. The shards'
own copies of the centroids are dropped for the first shard's (one copy per searcher instead of one per
shard). The inverted lists stay memory-mapped.

The assignment (every query against every centroid: most of the FLOPs) runs where ``use_device`` puts it:
faiss's GPUs, torch on a CUDA device (``copyscan.indexing.build.clustering.nearest``), or the CPU; the scan of
the inverted lists stays on the CPU, where the lists are.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from copyscan.indexing.build.clustering import nearest
from copyscan.indexing.runtime.devices import torch_device


class SharedCoarse:
    """Searches index shards ``indexes`` (same trained index, each an ``IndexIVF`` or an
    ``IndexPreTransform`` over one) with one coarse quantisation per query block. Build with ``of``."""

    def __init__(self, indexes: Sequence[faiss.Index], transforms: list, ivfs: list) -> None:
        self.indexes = list(indexes)  # keeps the first shard, which owns the shared quantizer, alive
        self.transforms = transforms  # the first shard's chain, applied once per block
        self.ivfs = ivfs
        self.quantizer = ivfs[0].quantizer
        self.device = "cpu"  # where ``assign`` finds the nearest lists (``use_device``)
        self._gpu_quantizer: faiss.Index | None = None
        self._centroids = None  # (nlist, d) torch tensor on the torch device

    @classmethod
    def of(cls, indexes: Sequence[faiss.Index]) -> SharedCoarse | None:
        """The shared search over ``indexes``, or None when they are not IVF shards with the same
        transforms and the same coarse quantizer (flat shards, shards of different trainings)."""
        parts = [_split(index) for index in indexes]
        if not parts or any(p is None for p in parts):
            return None
        transforms0, ivf0 = parts[0]
        for transforms, ivf in parts[1:]:
            if not (_same_transforms(transforms0, transforms) and _same_quantizer(ivf0, ivf)):
                return None
        shared = cls(indexes, transforms0, [ivf for _, ivf in parts])
        for ivf in shared.ivfs[1:]:
            _use_quantizer(ivf, shared.quantizer)
        return shared

    def use_device(self, device: str) -> str:
        """Find each query's nearest lists on ``device``
        (``copyscan.indexing.runtime.devices.compute_device``'s answer): ``faiss-gpu`` (a flat index of the
        centroids on every GPU), ``torch`` (the centroids as a tensor on torch's device: CUDA when this
        process holds a GPU, else the CPU) or ``cpu`` (the index's own quantizer). Returns what it runs on
        (``torch:cuda``, ...). The lists found are the same up to ties and rounding (float32 either way)."""
        centroids = self.quantizer.reconstruct_n(0, self.quantizer.ntotal)
        inner_product = self.ivfs[0].metric_type == faiss.METRIC_INNER_PRODUCT
        if device == "faiss-gpu":
            flat = (
                faiss.IndexFlatIP(centroids.shape[1])
                if inner_product
                else faiss.IndexFlatL2(centroids.shape[1])
            )
            flat.add(centroids)
            self._gpu_quantizer = faiss.index_cpu_to_all_gpus(flat)
            self.device = device
        elif device == "torch":
            import torch

            self._centroids = torch.as_tensor(centroids, device=torch_device())
            self._inner_product = inner_product
            self.device = f"torch:{self._centroids.device.type}"
        elif device != "cpu":
            raise ValueError(f"unknown device {device!r}")
        return self.device

    def search(self, xq: np.ndarray, ks: Sequence[int], nprobe: int = 0) -> list[np.ndarray]:
        """Top ``ks[i]`` ids of each query in shard ``i``: [(nq, ks[i]) int64], as each shard's own
        ``search`` returns them. xq: (nq, d) float32 in the index's space (before its transforms);
        nprobe: lists per query (0: the shards' own setting)."""
        return self.search_assigned(self.assign(xq, nprobe), ks)

    def search_assigned(self, assigned: tuple[np.ndarray, ...], ks: Sequence[int]) -> list[np.ndarray]:
        """``search`` of a block already through ``assign``."""
        x, Iq, Dq = assigned
        return [ivf.search_preassigned(x, k, Iq, Dq)[1] for ivf, k in zip(self.ivfs, ks, strict=True)]

    def range_search(
        self, assigned: tuple[np.ndarray, ...], tau: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Every vector of each shard whose approximate score with query ``i`` is at least ``tau[i]``:
        [(lims, D, I)] per shard, as faiss' ``range_search`` returns them, D in score units. ``assigned``:
        the query block through ``assign`` (the same lists as its top-k search).

        One radius per query, folded into the query (``copyscan.search.ann.radius``): lists are assigned with
        the query itself, then scanned with ``xq[i] / tau[i]`` against radius 1. tau: (nq,) float32, > 0."""
        x, Iq, Dq = assigned
        scale = np.asarray(tau, dtype=np.float32)[:, None]
        xs, Ds = np.ascontiguousarray(x / scale), np.ascontiguousarray(Dq / scale)
        out = []
        for ivf in self.ivfs:
            lims, D, I = ivf.range_search_preassigned(xs, 1.0, Iq, Ds)
            out.append((lims, D * np.repeat(scale[:, 0], np.diff(lims).astype(np.int64)), I))
        return out

    def assign(self, xq: np.ndarray, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The query block through the shards' transforms, and its ``nprobe`` nearest lists (Iq) with their
        scores (Dq), once for every shard; sets every shard's nprobe, which the preassigned scans read."""
        x = np.ascontiguousarray(xq, dtype=np.float32)
        for transform in self.transforms:
            x = transform.apply(x)
        nprobe = min(nprobe or self.ivfs[0].nprobe, self.ivfs[0].nlist)
        Dq, Iq = self._nearest_lists(x, nprobe)
        for ivf in self.ivfs:
            ivf.nprobe = nprobe  # search_preassigned reads the number of lists from the index
        return x, Iq, Dq

    def _nearest_lists(self, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(Dq, Iq): the ``nprobe`` nearest lists of each row of ``x``, on ``self.device``."""
        if self._gpu_quantizer is not None:
            return self._gpu_quantizer.search(x, nprobe)
        if self._centroids is None:
            return self.quantizer.search(x, nprobe)
        import torch

        with torch.no_grad():
            xs = torch.as_tensor(x, device=self._centroids.device)
            D, I = nearest(xs, self._centroids, nprobe, inner_product=self._inner_product)
        return D.cpu().numpy().astype(np.float32), I.cpu().numpy().astype(np.int64)


def _split(index: faiss.Index) -> tuple[list, faiss.IndexIVF] | None:
    """(transforms, IVF) of an ``IndexIVF`` or an ``IndexPreTransform`` directly over one; else None."""
    index = faiss.downcast_index(index)
    transforms = []
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        index = faiss.downcast_index(index.index)
    # not IndexIDMap & co: their ids are not the lists' ids, and search_preassigned would skip the mapping
    return (transforms, index) if isinstance(index, faiss.IndexIVF) else None


def _same_transforms(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for ta, tb in zip(a, b, strict=True):
        if type(ta) is not type(tb) or (ta.d_in, ta.d_out) != (tb.d_in, tb.d_out):
            return False
        if isinstance(ta, faiss.LinearTransform) and not (
            np.array_equal(faiss.vector_to_array(ta.A), faiss.vector_to_array(tb.A))
            and np.array_equal(faiss.vector_to_array(ta.b), faiss.vector_to_array(tb.b))
        ):
            return False
    return True


def _same_quantizer(a: faiss.IndexIVF, b: faiss.IndexIVF) -> bool:
    qa, qb = faiss.downcast_index(a.quantizer), faiss.downcast_index(b.quantizer)
    if type(qa) is not type(qb) or (a.nlist, a.d, a.metric_type) != (b.nlist, b.d, b.metric_type):
        return False
    if isinstance(qa, faiss.IndexFlatCodes):  # compared in place: no copy of the centroids
        size = qa.ntotal * qa.code_size
        return qb.ntotal * qb.code_size == size and np.array_equal(
            faiss.rev_swig_ptr(qa.codes.data(), size), faiss.rev_swig_ptr(qb.codes.data(), size)
        )
    return bool(np.array_equal(faiss.serialize_index(qa), faiss.serialize_index(qb)))


def _use_quantizer(ivf: faiss.IndexIVF, quantizer: faiss.Index) -> None:
    """Point ``ivf`` at ``quantizer`` (owned elsewhere) and free its own copy of the same centroids."""
    own = ivf.quantizer
    owned = ivf.own_fields
    ivf.own_fields = False  # the IVF must not delete the shared quantizer
    ivf.quantizer = quantizer
    if owned:
        # freed by a C++ owner: handing it to Python instead (``thisown``, as faiss.contrib's
        # replace_ivf_quantizer does) breaks SWIG's type lookups later on in faiss 1.15
        holder = faiss.IndexPreTransform(own)
        holder.own_fields = True
        del holder
