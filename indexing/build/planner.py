"""Choose the FAISS index for a collection: a pure function of its size, so it is tested exhaustively.

Rules (faiss wiki "Guidelines to choose an index", autofaiss), measured against ``bench/index.py``:
- below ``flat_threshold`` vectors, exact search (``IDMap,Flat``): nothing to train, recall 1;
- above it, IVF-PQ: nlist = the smallest power of two ≥ 4·√n (faiss: 4√n to 16√n lists), bounded so
  that every centroid gets at least 39 training points; PQ with ``m`` sub-quantizers of 8 bits (m divides
  d, ≤ ``max_code_bytes``); always the ``np`` suffix (no polysemous training: 10–70× faster training for
  no loss here);
- OPQ (a learned rotation that balances the variance across the PQ sub-vectors) only for vectors that are
  not whitened: whitened vectors already have balanced variance, so the rotation buys little there;
- training sample: 128 points per centroid, never outside faiss' 39–256;
- nprobe and re-rank candidates from ``recall_target`` (``RECALL_LADDER``, from the 1M-vector bench);
- index shards are groups of consecutive embedding shards of at most ``max_shard_vectors`` vectors, and
  fewer when ``shard_memory_bytes`` bounds the memory of a shard's ANN part (codes + ids + centroids).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from copyscan.indexing.errors import CopyscanError

MIN_POINTS_PER_CENTROID = 39
MAX_POINTS_PER_CENTROID = 256
TRAIN_POINTS_PER_CENTROID = 128
ID_BYTES = 8  # every inverted-list entry stores its int64 id next to its code

# (recall@10 target, nlist / nprobe, re-rank candidates per index shard), cheapest first. Measured with
# IVF4096,PQ64np over 1M vectors (bench/results/index_1m_localkde_cpu.json): nprobe 8 / 16 / 32 with 100
# candidates gave 0.980 / 0.985 / 0.989, nprobe 8 with 50 gave 0.941; re-rank depth matters more than
# nprobe there. The last rung was not measured (deeper on both axes).
RECALL_LADDER = (
    (0.94, 512, 50),
    (0.98, 512, 100),
    (0.985, 256, 100),
    (0.988, 128, 100),
    (0.995, 64, 200),
)


@dataclass(frozen=True)
class IndexPlan:
    factory: str
    nlist: int
    pq_m: int
    pq_bits: int
    train_size: int
    nprobe: int
    code_bytes: int  # bytes per vector of the PQ code (ids excluded; ann_bytes adds them)
    shard_groups: list[list[int]] = field(default_factory=list)
    candidates: int = 0  # re-rank candidates per index shard for the recall target; 0 = exact index
    opq: bool = False
    shard_bytes: int = 0  # estimated memory of the largest index shard's ANN part

    @property
    def ann_bytes(self) -> int:
        """Bytes per vector in the ANN part: code + id (a flat index stores the vector itself)."""
        return self.code_bytes + ID_BYTES

    @property
    def shard_count(self) -> int:
        return len(self.shard_groups)

    @property
    def is_flat(self) -> bool:
        return self.nlist == 0


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def _pow2_ceil(x: float) -> int:
    return 1 << max(0, int(math.ceil(math.log2(max(x, 1)))))


def choose_nlist(n: int) -> int:
    """Smallest power of two ≥ 4·√n, at most n / 39 (every centroid gets ≥ 39 training points)."""
    return max(1, min(_pow2_ceil(4 * math.sqrt(n)), _pow2_floor(n / MIN_POINTS_PER_CENTROID)))


def search_settings(nlist: int, recall_target: float) -> tuple[int, int]:
    """(nprobe, candidates) for ``recall_target`` of recall@10 after exact re-ranking (``RECALL_LADDER``)."""
    if not 0.0 < recall_target < 1.0:
        raise CopyscanError(f"recall_target must be in (0, 1), not {recall_target}")
    rung = next((r for r in RECALL_LADDER if recall_target <= r[0]), None)
    # beyond the ladder: visit a quarter of the lists, re-rank deep
    divisor, candidates = (rung[1], rung[2]) if rung else (4, 1000)
    return max(min(nlist, 8), min(nlist, 1024, nlist // divisor)), candidates


def fixed_shard_bytes(nlist: int, dim: int, opq: bool) -> int:
    """Memory of an index shard that does not grow with its vectors: centroids, list headers, OPQ matrix."""
    return nlist * (dim * 4 + 64) + (dim * dim * 4 if opq else 0)


def max_vectors_in(shard_memory_bytes: int, nlist: int, dim: int, ann_bytes: int, opq: bool) -> int:
    """Most vectors an index shard's ANN part holds within ``shard_memory_bytes``."""
    room = shard_memory_bytes - fixed_shard_bytes(nlist, dim, opq)
    if room < ann_bytes:
        raise CopyscanError(
            f"shard_memory_bytes={shard_memory_bytes:,} does not even hold the {nlist} centroids of d={dim} "
            f"({fixed_shard_bytes(nlist, dim, opq):,} bytes): raise it or leave it at 0 (no bound)"
        )
    return room // ann_bytes


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
    shard_memory_bytes: int = 0,
    recall_target: float = 0.95,
    whitened: bool = True,
) -> IndexPlan:
    """Plan the index for embedding shards with ``counts[shard]`` vectors of dimension ``dim``.

    ``factory`` other than "auto" is used as given (it must contain "np" if it has a PQ part).
    ``shard_memory_bytes`` (0 = no bound) caps each index shard's ANN part (codes, ids, centroids);
    ``recall_target`` (recall@10 after re-ranking) sets nprobe (unless given) and the re-rank depth;
    ``whitened``: the vectors are whitened before indexing (no OPQ then).
    """
    n = sum(counts.values())
    if n <= 0:
        raise CopyscanError(
            "no vectors to index: every shard is empty (see the shards' stats for rejections)"
        )
    if shard_memory_bytes < 0:
        raise CopyscanError("shard_memory_bytes must be >= 0 (0 = no bound)")
    if factory != "auto":
        plan = _plan_from_factory(factory, n, dim, nprobe, recall_target)
    elif n < flat_threshold:
        plan = IndexPlan("IDMap,Flat", 0, 0, 0, 0, 0, dim * 4)
    else:
        plan = _plan_ivf_pq(n, dim, max_code_bytes, nprobe, recall_target, whitened)
    return _with_shards(plan, counts, dim, max_shard_vectors, shard_memory_bytes)


def _plan_ivf_pq(
    n: int, dim: int, max_code_bytes: int, nprobe: int, recall_target: float, whitened: bool
) -> IndexPlan:
    """The IVF-PQ index for ``n`` vectors (the rules of the module docstring), without its index shards."""
    nlist = choose_nlist(n)
    m = choose_pq_m(dim, max_code_bytes)
    bits = 8 if n >= 256 * MIN_POINTS_PER_CENTROID else 4
    probe, candidates = search_settings(nlist, recall_target)
    opq = not whitened and m < dim
    bits_part = "" if bits == 8 else f"x{bits}"
    return IndexPlan(
        f"{f'OPQ{m},' if opq else ''}IVF{nlist},PQ{m}{bits_part}np",
        nlist,
        m,
        bits,
        _train_size(n, nlist, bits),
        nprobe or probe,
        math.ceil(m * bits / 8),
        candidates=candidates,
        opq=opq,
    )


def _with_shards(
    plan: IndexPlan, counts: Mapping[int, int], dim: int, max_shard_vectors: int, shard_memory_bytes: int
) -> IndexPlan:
    """``plan`` with its index shards (groups of embedding shards within the limits) and their memory."""
    groups = _groups(counts, max_shard_vectors, shard_memory_bytes, plan.nlist, dim, plan.ann_bytes, plan.opq)
    shard_bytes = _shard_bytes(groups, counts, plan.nlist, dim, plan.code_bytes, plan.opq)
    return dataclasses.replace(plan, shard_groups=groups, shard_bytes=shard_bytes)


def _train_size(n: int, nlist: int, bits: int) -> int:
    """128 points per centroid (within faiss' 39–256), enough for the PQ codebooks, never more than n."""
    per_centroid = min(MAX_POINTS_PER_CENTROID, max(MIN_POINTS_PER_CENTROID, TRAIN_POINTS_PER_CENTROID))
    return min(n, max(per_centroid * nlist, MIN_POINTS_PER_CENTROID * (1 << bits)))


def _groups(
    counts: Mapping[int, int],
    max_shard_vectors: int,
    shard_memory_bytes: int,
    nlist: int,
    dim: int,
    ann_bytes: int,
    opq: bool,
) -> list[list[int]]:
    bound = max_shard_vectors
    if shard_memory_bytes:
        bound = min(bound, max_vectors_in(shard_memory_bytes, nlist, dim, ann_bytes, opq))
        too_big = [s for s, c in counts.items() if c > bound]
        if too_big:
            raise CopyscanError(
                f"embedding shard(s) {too_big[:5]} hold more than the {bound:,} vectors that fit in "
                f"shard_memory_bytes={shard_memory_bytes:,}: raise it, or write smaller embedding shards"
            )
    return group_shards(counts, bound)


def _shard_bytes(
    groups: list[list[int]], counts: Mapping[int, int], nlist: int, dim: int, code: int, opq: bool
) -> int:
    largest = max((sum(counts[s] for s in g) for g in groups), default=0)
    return largest * (code + ID_BYTES) + fixed_shard_bytes(nlist, dim, opq)


def default_nprobe(nlist: int) -> int:
    """Lists visited per query at the default recall target (0.95)."""
    return search_settings(nlist, 0.95)[0]


def _plan_from_factory(factory: str, n: int, dim: int, nprobe: int, recall_target: float) -> IndexPlan:
    """The plan of an index_factory string given by the user, checked against ``n`` and ``dim``, without
    its index shards."""
    import re

    ivf = re.search(r"IVF(\d+)", factory)
    pq = re.search(r"(?<![A-Za-z])PQ(\d+)(?:x(\d+))?(np)?", factory)  # not OPQ's "PQ"
    opq = re.search(r"(?<![A-Za-z])OPQ(\d+)", factory) is not None
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
    probe, candidates = search_settings(nlist, recall_target) if nlist else (0, 0)
    return IndexPlan(
        factory, nlist, m, bits, train_size, nprobe or probe, code, candidates=candidates, opq=opq
    )
