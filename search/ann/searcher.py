"""Search a set of index shards held locally: ANN candidates, then exact re-ranking from stored vectors.

A ``ShardSearcher`` downloads its index shards and their embedding shards once into a local cache
(skipped when already there), memory-maps them, and answers query blocks. Re-ranking happens here,
next to the vectors, so only the final top-k of each shard travels back to be merged.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from copyscan.indexing.build.postprocess import whitened_score_terms
from copyscan.indexing.embed.provenance import PROVENANCE
from copyscan.indexing.runtime.devices import compute_device
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import resolve
from copyscan.search.ann.coarse import SharedCoarse
from copyscan.search.ann.exact import distinct, pair_dots, through_stages
from copyscan.search.ann.normalise import load_whitening, whiten
from copyscan.search.ann.radius import Above, capped, extra_columns, range_search_index
from copyscan.search.ann.topk import ShardResult, carry_values, merge_topk

logger = logging.getLogger("copyscan")

RERANK_BLOCK = 64  # queries re-ranked at once: bounds the gathered candidate block to 64·candidates·d floats
# queries range-searched at once (scan radius): bounds a block's results to 64·(k + radius_max) per shard
RANGE_BLOCK = 64


def default_cache_dir() -> str:
    return os.environ.get("COPYSCAN_CACHE", os.path.expanduser("~/.cache/copyscan"))


def index_cache_dir(cache_dir: str, index_url: str, manifest: dict[str, Any]) -> str:
    """A cache folder per index *version*: a rebuilt index at the same URL gets a new folder."""
    tag = hashlib.sha256(f"{index_url}|{manifest['build_id']}|{manifest['ntotal']}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir or default_cache_dir(), "index", tag)


def _cached(url: str, local: str, storage_options: storage.StorageOptions | None) -> str:
    if storage.is_local(url):
        return storage.local_path(url)
    if not os.path.exists(local):
        storage.download_file(url, local, storage_options)
    return local


# an embedding shard's metadata columns a match carries (copyscan.indexing.embed.stage.METADATA_SCHEMA)
DESCRIBED = ("key", "url", "caption", "sha256", *PROVENANCE)


def load_metadata(
    url: str, local: str, storage_options: storage.StorageOptions | None
) -> dict[str, np.ndarray]:
    """The columns of an embedding shard's metadata (cached at ``local``) that matches carry, as arrays
    (``DESCRIBED``; those an index built before them lacks are left out, so read as None)."""
    path = _cached(url, local, storage_options)
    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in DESCRIBED if c in present])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def describe_row(columns: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """One training image's metadata as matches carry it (``train_key``, ``train_url``, ``caption``,
    ``sha256`` and the provenance columns), from its shard's ``load_metadata`` columns."""
    out = {f"train_{c}" if c in ("key", "url") else c: None for c in DESCRIBED}
    for name, values in columns.items():
        value = values[row]
        out[f"train_{name}" if name in ("key", "url") else name] = (
            None if isinstance(value, (float, np.floating)) and np.isnan(value) else value
        )
    return out


def _read_index_mmap(path: str) -> faiss.Index:
    try:
        return faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        # Not every index type can be memory-mapped (e.g. flat codes in some faiss builds).
        return faiss.read_index(path)


class ShardSearcher:
    """Owns index shards ``index_shards`` (entries of the manifest) of the index at ``index_url``."""

    def __init__(
        self,
        index_url: str,
        manifest: dict[str, Any],
        index_shards: Sequence[int],
        cache_dir: str = "",
        storage_options: storage.StorageOptions | None = None,
        density_beta: float = 0.0,
        device: str = "cpu",
    ) -> None:
        self.index_url = index_url
        self.manifest = manifest
        self.cache = index_cache_dir(cache_dir, index_url, manifest)
        self.indexes: dict[int, faiss.Index] = {}
        self.vectors: dict[int, np.ndarray] = {}  # embedding shard -> (n, d) float16 memmap
        self.metadata: dict[int, dict[str, np.ndarray]] = {}
        self.owner: dict[int, int] = {}  # embedding shard -> index shard
        self._load_shards(index_shards, storage_options)
        self.dim = int(manifest["dim"])
        # the shards of one trained index share its coarse quantizer: quantize each query block once
        self.coarse = SharedCoarse.of(list(self.indexes.values()))
        # where the coarse assignment runs (device: auto | cpu | faiss-gpu | torch, compute_device)
        self.device = "cpu"
        if self.coarse is not None:
            self.device = self.coarse.use_device(compute_device(device, "search_device"))
        self.whitening = load_whitening(index_url, manifest, storage_options)
        # whitening norms of the stored vectors (indexes built since they were written): exact re-ranking
        # with one dot product per candidate instead of whitening every candidate again
        self.norms: dict[int, np.ndarray] | None = None
        if self.whitening is not None and manifest["index"].get("whitened_norms"):
            self.norms = self._per_shard("norms", storage_options)
        # a region index's densities (copyscan.indexing.build.ivf.DENSITY_RANKS): hits rank by cosine − β ·
        # (density − the index's mean density), so generic regions (sky, texture: near everything) do not
        # crowd out the real match; the mean keeps the scores centred as without densities
        self.density: dict[int, np.ndarray] | None = None
        self.density_beta = float(density_beta)
        self.density_mean = float(manifest["index"].get("region_density_mean") or 0.0)
        if self.density_beta and manifest["index"].get("region_density"):
            densities = self._per_shard("density", storage_options)
            self.density = {s: d[:, None] for s, d in densities.items()}  # (n, 1), like the norms

    def _load_shards(
        self, index_shards: Sequence[int], storage_options: storage.StorageOptions | None
    ) -> None:
        """Caches and opens each index shard (memory-mapped) and, for its embedding shards, the stored
        vectors and the metadata columns; fills ``indexes``, ``owner``, ``vectors`` and ``metadata``."""
        entries = {e["index_shard"]: e for e in self.manifest["index_shards"]}
        emb = {e["shard"]: e for e in self.manifest["embedding_shards"]}
        for j in index_shards:
            entry = entries[j]
            self.indexes[j] = _read_index_mmap(self._cached(entry["path"], storage_options))
            for s in entry["embedding_shards"]:
                self.owner[s] = j
                self.vectors[s] = np.load(self._cached(emb[s]["img_emb"], storage_options), mmap_mode="r")
                if emb[s].get("metadata") is None:  # a region index: its images' metadata is the index's
                    continue
                self.metadata[s] = load_metadata(
                    resolve(self.index_url, emb[s]["metadata"]),
                    os.path.join(self.cache, emb[s]["metadata"]),
                    storage_options,
                )

    def _cached(self, rel: str, storage_options: storage.StorageOptions | None) -> str:
        """Local path of the index's file ``rel`` (a path relative to the index), downloaded once."""
        return _cached(resolve(self.index_url, rel), os.path.join(self.cache, rel), storage_options)

    def _per_shard(self, name: str, storage_options: storage.StorageOptions | None) -> dict[int, np.ndarray]:
        """Each embedding shard's ``<index dir>/<name>/<name>_NNNNN.npy`` (``layout.norms_url``,
        ``layout.density_url``), cached locally and memory-mapped."""
        out = {}
        for s in self.vectors:
            rel = f"{self.manifest['index']['dir']}/{name}/{name}_{s:05d}.npy"
            out[s] = np.load(self._cached(rel, storage_options), mmap_mode="r")
        return out

    @property
    def ntotal(self) -> int:
        return sum(int(ix.ntotal) for ix in self.indexes.values())

    def set_nprobe(self, nprobe: int) -> None:
        for index in self.indexes.values():
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None and nprobe > 0:
                ivf.nprobe = min(nprobe, ivf.nlist)

    def search(
        self, xq: np.ndarray, k: int, candidates: int, nprobe: int = 0, above: Above | None = None
    ) -> ShardResult:
        """xq: (nq, d) float32 raw (unwhitened) unit descriptors. Exact top-k over this searcher's shards;
        with ``above``, each query's row continues with every further vector of exact score >= above.lo
        (at most above.extra, best first; ``copyscan.search.ann.radius``), so rows are k + (the most any query
        got) wide, padded with -1."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        xw = whiten(self.whitening, xq)
        if nprobe:
            self.set_nprobe(nprobe)
        # the block's coarse assignment, once for its top k and its range search (SharedCoarse.assign)
        assigned = self.coarse.assign(xw, nprobe) if self.coarse is not None else None
        found = self._candidates(xw, candidates, nprobe, assigned)
        terms = self.score_terms(xw)  # once for every block and shard
        parts = [self.rerank(xq, xw, I0, k, terms) for I0 in found]
        D, I = merge_topk([(D, I) for D, I, _, _ in parts], k)
        D_raw = carry_values(I, [(I, R) for _, I, R, _ in parts])
        prior = carry_values(I, [(I, P) for _, I, _, P in parts]) if self.density is not None else None
        if above is None:
            return ShardResult(D, I, D_raw, self.describe(I), prior=prior)
        if self.density is not None:
            raise ValueError("a range search is for the global index (region hits rank with densities)")
        D, I, D_raw, truncated = self._with_above(xq, xw, D, I, D_raw, above, k, nprobe, assigned, terms)
        return ShardResult(D, I, D_raw, self.describe(I), truncated=truncated)

    def _candidates(
        self, xw: np.ndarray, candidates: int, nprobe: int = 0, assigned: tuple | None = None
    ) -> list[np.ndarray]:
        """The approximate top ``candidates`` of every query in each index shard: [(nq, c) int64 ids].
        ``assigned``: the block's ``SharedCoarse.assign``, when the shards share one."""
        ks = [min(candidates, max(int(index.ntotal), 1)) for index in self.indexes.values()]
        if self.coarse is not None:
            return self.coarse.search_assigned(assigned or self.coarse.assign(xw, nprobe), ks)
        return [index.search(xw, c)[1] for index, c in zip(self.indexes.values(), ks, strict=True)]

    def _with_above(
        self,
        xq: np.ndarray,
        xw: np.ndarray,
        D: np.ndarray,
        I: np.ndarray,
        D_raw: np.ndarray,
        above: Above,
        k: int,
        nprobe: int = 0,
        assigned: tuple | None = None,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The top k (D, I, D_raw: (nq, k)) followed by each query's extra vectors of exact score >= lo.

        Candidates per query and shard: range search down to lo - margin with the floor folded into the
        query, cut to the k + extra best approximate scores; a query whose floor is too low to range-search
        (``Above.tau``) takes its approximate top k + extra instead. They are scored exactly and kept when
        they reach lo and are not among the top k. truncated: (nq,) bool, the queries that may have more
        than were kept (a cut range list, a top k + extra whose last still reaches lo, more than ``extra``).
        Returns (D, I, D_raw, truncated)."""
        nq = len(xq)
        tau, deep = above.tau()
        cap = k + above.extra
        found: list[tuple[np.ndarray, ...]] = []  # (owner, ids, exact, raw) of the kept extras
        truncated = np.zeros(nq, dtype=bool)
        for q0 in range(0, nq, RANGE_BLOCK):
            block = np.arange(q0, min(q0 + RANGE_BLOCK, nq))
            lists = []  # (owner, ids, cut) per shard: cut = the rows whose candidates may go on
            ranged = block[np.isfinite(tau[block]) & ~deep[block]]
            if len(ranged):
                lists += self._ranged_candidates(xw, ranged, tau[ranged], cap, assigned)
            if deep[block].any():
                lists += self._deep_candidates(xw, block[deep[block]], above, cap, nprobe, assigned, terms)
            for owner, ids, cut in lists:
                truncated[cut] = True
                found.append(self._exact_above(xq, xw, I, owner, ids, above, terms))
        if not found:
            return D, I, D_raw, truncated
        D_x, I_x, R_x, more = extra_columns(found, nq, above.extra)
        return np.hstack([D, D_x]), np.hstack([I, I_x]), np.hstack([D_raw, R_x]), truncated | more

    def _ranged_candidates(
        self, xw: np.ndarray, rows: np.ndarray, tau: np.ndarray, cap: int, assigned: tuple | None
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Range search of the queries ``xw[rows]`` down to their floors ``tau`` ((len(rows),)) in every
        shard, each list cut to its ``cap`` best: [(owner, ids, cut)] per shard (owner: query rows of the
        candidates, cut: the rows whose list was cut)."""
        if assigned is not None:
            results = self.coarse.range_search(tuple(a[rows] for a in assigned), tau)
        else:
            results = [range_search_index(ix, xw[rows], tau) for ix in self.indexes.values()]
        lists = []
        for lims, D_ann, I_ann in results:
            owner, ids, _, more = capped(lims, D_ann, I_ann, cap)
            lists.append((rows[owner], ids, rows[more]))
        return lists

    def _deep_candidates(
        self,
        xw: np.ndarray,
        rows: np.ndarray,
        above: Above,
        cap: int,
        nprobe: int,
        assigned: tuple | None,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The approximate top ``cap`` of the queries ``xw[rows]`` (floors too low to range-search) in
        every shard: [(owner, ids, cut)] per shard (cut: full lists whose last still reaches above.lo)."""
        part = tuple(a[rows] for a in assigned) if assigned is not None else None
        lists = []
        for I_top in self._candidates(xw[rows], cap, nprobe, part):
            r, c = np.nonzero(I_top >= 0)
            # a full list whose last (lowest) candidate still reaches the floor may go on
            full = np.flatnonzero((I_top[:, -1] >= 0) & (I_top.shape[1] == cap))
            last = self.pair_scores(xw, rows[full], I_top[full, -1], terms)
            lists.append((rows[r], I_top[r, c], rows[full[last >= above.lo[rows[full]]]]))
        return lists

    def _exact_above(
        self,
        xq: np.ndarray,
        xw: np.ndarray,
        I: np.ndarray,
        owner: np.ndarray,
        ids: np.ndarray,
        above: Above,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The candidates (query ``owner``, stored ``ids``) not in their query's top k ``I`` whose exact
        score reaches ``above.lo``: (owner, ids, exact scores, raw cosines), all (m,)."""
        new = ~(I[owner] == ids[:, None]).any(1)  # not one of the query's top k
        owner, ids = owner[new], ids[new]
        raw = self.gather(ids)
        exact = self._pair_scores(raw, xw, owner, ids, terms)
        passing = exact >= above.lo[owner]
        raw_scores = np.einsum("md,md->m", raw[passing], xq[owner[passing]])
        return owner[passing], ids[passing], exact[passing], raw_scores

    def rerank(
        self,
        xq: np.ndarray,
        xw: np.ndarray,
        I0: np.ndarray,
        k: int,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Exact scores of each query with its candidates ``I0`` (nq, c) → top-k (D, I, D_raw, prior).

        xq: raw queries, xw: the same in the index's space, terms: their ``score_terms`` (computed here when
        not given). D ranks in the index's space (minus the prior: β · (region density − mean density), 0
        without densities); D_raw is the cosine of the raw descriptors of the same pairs.
        """
        nq, c = I0.shape
        if terms is None:
            terms = self.score_terms(xw)
        D_out = np.full((nq, k), -np.inf, dtype=np.float32)
        R_out = np.full((nq, k), np.nan, dtype=np.float32)
        P_out = np.zeros((nq, k), dtype=np.float32)
        I_out = np.full((nq, k), -1, dtype=np.int64)
        for q0 in range(0, nq, RERANK_BLOCK):
            block = slice(q0, q0 + RERANK_BLOCK)
            ids = I0[block]
            nb = ids.shape[0]
            part = None if terms is None else (terms[0][block], terms[1][block])
            scores, raw_scores, prior = self._block_scores(ids, xq[block], xw[block], part)
            scores[ids < 0] = -np.inf
            top = min(k, c)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
            D_out[q0 : q0 + nb, :top] = np.take_along_axis(scores, order, axis=1)
            R_out[q0 : q0 + nb, :top] = np.take_along_axis(raw_scores, order, axis=1)
            I_out[q0 : q0 + nb, :top] = np.take_along_axis(ids, order, axis=1)
            P_out[q0 : q0 + nb, :top] = np.take_along_axis(prior, order, axis=1)
        invalid = ~np.isfinite(D_out)
        I_out[invalid] = -1
        R_out[invalid] = np.nan
        P_out[invalid] = 0.0
        return D_out, I_out, R_out, P_out

    def _block_scores(
        self, ids: np.ndarray, xq: np.ndarray, xw: np.ndarray, terms: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A block's candidates ``ids`` (nb, c) of raw queries ``xq`` (xw: in the index's space, terms: their
        ``score_terms``) → (scores in the index's space minus the prior, raw cosines, prior), (nb, c) float32
        each; every distinct candidate gathered once (``copyscan.search.ann.exact``)."""
        unique, inverse = distinct(ids)
        raw = self.gather(unique)
        if terms is not None:
            b, c = terms
            dots, raw_scores = pair_dots(np.stack([b, xq], axis=1), raw, inverse).transpose(1, 0, 2)
            norms = self._gather_rows(self.norms, unique, c.shape[1])[inverse]
            scores = through_stages(dots, c[:, None, :], norms)
        else:
            scores = pair_dots(xw[:, None, :], whiten(self.whitening, raw), inverse)[:, 0]
            raw_scores = pair_dots(xq[:, None, :], raw, inverse)[:, 0]
        prior = np.zeros(ids.shape, dtype=np.float32)
        if self.density is not None:
            density = self._gather_rows(self.density, unique, 1)[inverse, 0]
            prior = self.density_beta * (density - self.density_mean)
            prior = np.nan_to_num(prior, nan=0.0)  # too few background neighbours: none
            scores = scores - prior
        return scores, raw_scores, prior

    def score_terms(self, xw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``whitened_score_terms`` of queries ``xw`` (nq, k) in the index's space, computed once per search
        for every re-ranking block and shard; None without stored whitening norms (whitened again)."""
        return whitened_score_terms(self.whitening, xw) if self.norms is not None else None

    def pair_scores(
        self,
        xw: np.ndarray,
        owner: np.ndarray,
        ids: np.ndarray,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """(m,) float32 exact scores in the index's space of the pairs (query ``xw[owner[i]]``, stored
        vector ``ids[i]``), for ragged candidate lists (range search); xw: (nq, k) in the index's space,
        terms: its ``score_terms`` when the caller has them."""
        return self._pair_scores(self.gather(ids), xw, owner, ids, terms)

    def _pair_scores(
        self,
        raw: np.ndarray,
        xw: np.ndarray,
        owner: np.ndarray,
        ids: np.ndarray,
        terms: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``pair_scores`` of stored vectors ``raw`` (gathered rows of ``ids``)."""
        if self.norms is None:
            return np.einsum("md,md->m", whiten(self.whitening, raw), xw[owner])
        b, terms = terms if terms is not None else whitened_score_terms(self.whitening, xw)
        norms = self._gather_rows(self.norms, ids, terms.shape[1])
        return through_stages(np.einsum("md,md->m", raw, b[owner]), terms[owner], norms)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of packed ``ids`` as (len(ids), d) float32; zeros for -1.

        One sort of all ids, then one fancy-index read per embedding shard on sorted rows (memmap reads
        are fastest in order), scattered back into request order.
        """
        half = self._gather_rows(self.vectors, ids, self.dim, np.float16)  # stored dtype: no casts
        return half.astype(np.float32)  # one contiguous cast (a casting scatter is ~1.5x slower)

    @staticmethod
    def _gather_rows(
        store: dict[int, np.ndarray], ids: np.ndarray, width: int, dtype: type = np.float32
    ) -> np.ndarray:
        """Rows of packed ``ids`` from per-embedding-shard arrays ``store`` as (len(ids), width); zeros
        for -1 (ones for norms would be as wrong: such rows are masked by the caller)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), width), dtype=dtype)
        order = np.argsort(ids, kind="stable")
        order = order[ids[order] >= 0]
        shard, row = layout.unpack_ids(ids[order])
        starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]]) if len(shard) else np.zeros(0, int)
        for lo, hi in zip(starts, np.r_[starts[1:], len(shard)][: len(starts)], strict=True):
            out[order[lo:hi]] = store[int(shard[lo])][row[lo:hi]]
        return out

    def describe(self, I: np.ndarray) -> dict[int, dict[str, Any]]:
        """Metadata of every id in ``I`` (any shape, int64 packed ids; -1 skipped)."""
        meta: dict[int, dict[str, Any]] = {}
        unique = np.unique(I[I >= 0])
        shards, rows = layout.unpack_ids(unique)
        for i, s, r in zip(unique.tolist(), shards.tolist(), rows.tolist(), strict=True):
            meta[i] = {**describe_row(self.metadata[s], r), "index_shard": self.owner[s]}
        return meta
