"""Choose the FAISS index for a collection: a pure function of its size, so it is tested exhaustively.

Rules (faiss wiki "Guidelines to choose an index", autofaiss):
- below ``flat_threshold`` vectors, exact search (``IDMap,Flat``): nothing to train, recall 1;
- above it, IVF-PQ: nlist ≈ 4·√n rounded to a power of two, bounded so that every centroid gets at least
  39 training points; PQ with ``m`` sub-quantizers of 8 bits (m divides d, ≤ ``max_code_bytes``); always
  the ``np`` suffix (no polysemous training: 10–70× faster training for no loss here);
- training sample: up to 128 points per centroid (bounded memory), at least 39;
- index shards are groups of consecutive embedding shards of at most ``max_shard_vectors`` vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from indexing.errors import CopyscanError

MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 128


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int
    pq_m: int
    pq_bits: int
    train_size: int
    nprobe: int
    code_bytes: int  # bytes per vector in the ANN part (codes only, excluding ids)
    shard_groups: list[list[int]] = field(default_factory=list)

    @property
    def is_flat(self) -> bool:
        return self.nlist == 0


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def choose_pq_m(dim: int, max_code_bytes: int) -> int:
    """Largest m ≤ max_code_bytes dividing ``dim`` with at least 2 dimensions per sub-quantizer."""
    candidates = [m for m in range(1, min(max_code_bytes, dim // 2) + 1) if dim % m == 0]
    if not candidates:
        raise CopyscanError(f"no PQ size fits dim={dim} within {max_code_bytes} bytes")
    return max(candidates)


def group_shards(counts: Mapping[int, int], max_shard_vectors: int) -> list[list[int]]:
    """Consecutive embedding shards (by id) packed into groups of at most ``max_shard_vectors`` vectors.

    A single embedding shard larger than the bound gets a group of its own.
    """
    if max_shard_vectors <= 0:
        raise CopyscanError("max_shard_vectors must be positive")
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for shard in sorted(counts):
        n = counts[shard]
        if current and size + n > max_shard_vectors:
            groups.append(current)
            current, size = [], 0
        current.append(shard)
        size += n
    if current:
        groups.append(current)
    return groups


def plan_index(
    counts: Mapping[int, int],
    dim: int,
    *,
    factory: str = "auto",
    flat_threshold: int = 100_000,
    max_shard_vectors: int = 10_000_000,
    max_code_bytes: int = 64,
    nprobe: int = 0,
) -> IndexPlan:
    """Plan the index for embedding shards with ``counts[shard]`` vectors of dimension ``dim``.

    ``factory`` other than "auto" is used as given (it must contain "np" if it has a PQ part).
    """
    n = sum(counts.values())
    if n <= 0:
        raise CopyscanError(
            "no vectors to index: every shard is empty (see the shards' stats for rejections)"
        )
    groups = group_shards(counts, max_shard_vectors)
    if factory != "auto":
        return _plan_from_factory(factory, n, dim, groups, nprobe)
    if n < flat_threshold:
        return IndexPlan("IDMap,Flat", 0, 0, 0, 0, 0, dim * 4, groups)
    nlist = _pow2_floor(4 * math.sqrt(n))
    nlist = max(1, min(nlist, _pow2_floor(n / MIN_POINTS_PER_CENTROID)))
    m = choose_pq_m(dim, max_code_bytes)
    bits = 8 if n >= 256 * MIN_POINTS_PER_CENTROID else 4
    train_size = min(n, max(TRAIN_POINTS_PER_CENTROID * nlist, MIN_POINTS_PER_CENTROID * (1 << bits)))
    probe = nprobe or default_nprobe(nlist)
    bits_part = "" if bits == 8 else f"x{bits}"
    return IndexPlan(
        f"IVF{nlist},PQ{m}{bits_part}np", nlist, m, bits, train_size, probe, math.ceil(m * bits / 8), groups
    )


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/16 of them, within [min(nlist, 16), 256]; re-ranking recovers the rest."""
    return max(min(nlist, 16), min(256, nlist // 16))


def _plan_from_factory(factory: str, n: int, dim: int, groups: list[list[int]], nprobe: int) -> IndexPlan:
    import re

    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"PQ(\d+)(?:x(\d+))?(np)?", factory)
    if pq and not pq.group(3):
        raise CopyscanError(f"index_factory {factory!r}: add the 'np' suffix to the PQ part (e.g. PQ32np)")
    nlist = int(ivf.group(1)) if ivf else 0
    m = int(pq.group(1)) if pq else 0
    bits = int(pq.group(2) or 8) if pq else 0
    if m and dim % m:
        raise CopyscanError(f"index_factory {factory!r}: PQ{m} does not divide dim={dim}")
    if nlist and n < nlist:
        raise CopyscanError(f"index_factory {factory!r}: {n} vectors cannot train {nlist} lists")
    train_size = min(n, max(TRAIN_POINTS_PER_CENTROID * nlist, 256 * 39 if m else 0)) if nlist or m else 0
    code = math.ceil(m * bits / 8) if m else dim * 4
    if nlist == 0 and not factory.startswith("IDMap"):
        factory = f"IDMap,{factory}"
    return IndexPlan(
        factory, nlist, m, bits, train_size, nprobe or (default_nprobe(nlist) if nlist else 0), code, groups
    )
