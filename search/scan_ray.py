"""The scan job on Ray: embed query chunks, fan each chunk out to the scan actors, merge, write.

Scan actors each own a set of index shards (downloaded once into a local cache and memory-mapped, never
re-fetched per chunk) and return exact re-ranked top-k lists; the driver merges them with a heap and
writes one parquet part per chunk. Embedding actors run ahead on the next chunks meanwhile.
"""

from __future__ import annotations

import inspect
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from indexing.embed.decode import DecodeLimits
from indexing.embed.embed_ray import embed_pool_size, embedder_spec_remote, make_embed_actor
from indexing.embed.stage import EmbeddedSource
from indexing.errors import CopyscanError
from indexing.runtime.config import to_dict
from indexing.runtime.pool_ray import TaskStream, run_pool
from indexing.runtime.progress import Progress
from indexing.store import layout, storage
from indexing.store.manifest import check_embedder, load_manifest
from indexing.store.outputs import claim_output
from search.ann.normalise import ScoreNormaliser, whiten
from search.ann.radius import Above, keep_above, radius_counts
from search.ann.searcher import ShardSearcher
from search.ann.topk import ShardResult, carry_values, merge_sorted_with, merge_topk
from search.calibrate.thresholds import resolve_partial_threshold, resolve_threshold
from search.regions.local import LocalWindows, RegionSearcher, local_windows
from search.results.matches import finished_chunks, summarize, write_chunk
from search.scan_chunks import QueryChunk, plan_query_chunks
from search.scan_config import ScanConfig
from search.verify.dense import DenseSpec, verify_dense
from search.verify.matches import MatchVerifier, VerifySpec

logger = logging.getLogger("copyscan")


class ScanWorker:
    """Actor body: a ShardSearcher over some index shards (a RegionSearcher over region index shards when
    ``regions``: ``manifest`` is then the region index's)."""

    def __init__(
        self,
        index_url: str,
        manifest: dict[str, Any],
        index_shards: list[int],
        cache_dir: str,
        storage_options,
        regions: bool = False,
        density_beta: float = 0.0,
    ):
        if regions:
            self.searcher = RegionSearcher(
                index_url, manifest, index_shards, cache_dir, storage_options, density_beta
            )
        else:
            self.searcher = ShardSearcher(index_url, manifest, index_shards, cache_dir, storage_options)

    def ready(self) -> int:
        return self.searcher.ntotal

    def search(
        self, xq: np.ndarray, k: int, candidates: int, nprobe: int, above: Above | None = None
    ) -> ShardResult:
        return self.searcher.search(xq, k, candidates, nprobe, above)

    def pair_scores(self, xq: np.ndarray, owner: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of the pairs (raw query ``xq[owner[i]]``, stored vector ``ids[i]``) whose vectors this
        actor holds; NaN for the others (another actor's)."""
        out = np.full(len(ids), np.nan, dtype=np.float32)
        shards = np.asarray(ids, dtype=np.int64) >> 32
        mine = (np.asarray(ids) >= 0) & np.isin(shards, list(self.searcher.vectors))
        if mine.any():
            xw = whiten(self.searcher.whitening, np.ascontiguousarray(xq, dtype=np.float32))
            out[mine] = self.searcher.pair_scores(xw, np.asarray(owner)[mine], np.asarray(ids)[mine])
        return out

    def memory(self) -> dict[str, int]:
        """This actor's faiss threads, and its resident memory now and at its peak in bytes (with the
        memory-mapped index and vector pages it touched, which the OS can drop and share between actors)."""
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return {
            "omp_threads": faiss.omp_get_max_threads(),
            "rss_bytes": resident_pages * os.sysconf("SC_PAGE_SIZE"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


def assign_shards(manifest: dict[str, Any], num_actors: int) -> list[list[int]]:
    """Index shards dealt to actors, largest first onto the least-loaded actor."""
    entries = sorted(manifest["index_shards"], key=lambda e: -e["ntotal"])
    groups: list[list[int]] = [[] for _ in range(max(1, min(num_actors, len(entries))))]
    loads = [0] * len(groups)
    for e in entries:
        i = int(np.argmin(loads))
        groups[i].append(e["index_shard"])
        loads[i] += e["ntotal"]
    return [sorted(g) for g in groups]


class _Fanout:
    """Scan actors over every shard of an index (``regions``: of its region index, ``manifest`` being the
    region index's); ``search`` broadcasts a query block and merges their top ``k``."""

    def __init__(
        self,
        cfg: ScanConfig,
        manifest: dict[str, Any],
        settings: dict[str, Any],
        regions: bool = False,
        k: int = 0,
    ):
        self.cfg = cfg
        self.manifest = manifest
        self.regions = regions
        self.k = k or cfg.k
        self.candidates, self.nprobe = max(settings["candidates"], self.k), settings["nprobe"]
        cpus = float(ray.cluster_resources().get("CPU", 1))
        wanted = cfg.scan_actors or max(1, int(cpus // 2))
        self.groups = assign_shards(manifest, wanted)
        self.actors = [self._start(g) for g in self.groups]
        ntotal = ray.get([a.ready.remote() for a in self.actors])
        logger.info(
            "scan: %d %sscan actor(s) hold %s vectors: %s",
            len(self.actors),
            "region " if regions else "",
            f"{sum(ntotal):,}",
            self.groups,
        )

    def _start(self, group: list[int]):
        return (
            ray.remote(ScanWorker)
            .options(num_cpus=self.cfg.scan_actor_cpus)
            .remote(
                self.cfg.index,
                self.manifest,
                group,
                self.cfg.cache_dir,
                self.cfg.storage_options,
                self.regions,
                self.cfg.region_density_beta if self.regions else 0.0,
            )
        )

    def search(self, xq: np.ndarray, above: Above | None = None) -> ShardResult:
        """Top k of every query from all actors, merged; with ``above``, followed by each query's further
        matches of score >= above.lo (``search.ann.radius``)."""
        cfg = self.cfg
        xq_ref = ray.put(np.ascontiguousarray(xq, dtype=np.float32))
        for attempt in range(cfg.retries + 1):
            refs = [a.search.remote(xq_ref, self.k, self.candidates, self.nprobe, above) for a in self.actors]
            try:
                parts = ray.get(refs)
                break
            except RayActorError:
                if attempt == cfg.retries:
                    raise
                logger.warning("scan: a scan actor died; restarting the dead ones and retrying the chunk")
                self._restart_dead()
        meta: dict[int, dict[str, Any]] = {}
        for p in parts:
            meta.update(p.meta)
        if above is not None:  # rows of k + extra matches: merged with their raw scores, not carried by id
            D, I, D_raw = merge_sorted_with([(p.D, p.I, p.D_raw) for p in parts], self.k + above.extra)
            found = sum((p.I >= 0).sum(1) for p in parts)  # more than the merge keeps: truncated too
            truncated = np.logical_or.reduce([p.truncated for p in parts]) | (found > self.k + above.extra)
            return ShardResult(D, I, D_raw, meta, truncated=truncated)
        D, I = merge_topk([(p.D, p.I) for p in parts], self.k)
        D_raw = carry_values(I, [(p.I, p.D_raw) for p in parts])
        prior = None
        if any(p.prior is not None for p in parts):
            prior = carry_values(I, [(p.I, p.prior) for p in parts if p.prior is not None], fill=0.0)
        return ShardResult(D, I, D_raw, meta, prior=prior)

    def pair_scores(self, xq: np.ndarray, owner: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(m,) exact scores of the pairs (``xq[owner[i]]``, stored vector ``ids[i]``) from the actors holding
        them; NaN where no actor does (ids of -1)."""
        xq_ref = ray.put(np.ascontiguousarray(xq, dtype=np.float32))
        parts = ray.get([a.pair_scores.remote(xq_ref, owner, ids) for a in self.actors])
        with np.errstate(invalid="ignore"):
            stacked = np.stack(parts) if parts else np.full((1, len(ids)), np.nan, np.float32)
            found = ~np.isnan(stacked)
            return np.where(
                found.any(0), np.nanmax(np.where(found, stacked, -np.inf), axis=0), np.nan
            ).astype(np.float32)

    def _restart_dead(self) -> None:
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.ready.remote())
            except RayActorError:
                self.actors[i] = self._start(self.groups[i])
        ray.get([a.ready.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_scan(cfg: ScanConfig) -> dict[str, Any]:
    """Run (or resume) a scan; returns the summary written to ``OUT/summary.json``."""
    so = cfg.storage_options
    t0 = time.time()
    manifest = load_manifest(cfg.index, so)
    chunks = plan_query_chunks(cfg.queries, cfg.chunk_size, so)
    resumed = claim_output(
        cfg.out,
        layout.RUN_CONFIG_NAME,
        to_dict(cfg),
        cfg.mode,
        ScanConfig.RESUME_KEYS,
        so,
        ScanConfig.RESUME_ABSENT,
    )
    done = finished_chunks(cfg.out, so)
    stale = sorted(c for c, m in done.items() if m.get("index_build_id") != manifest["build_id"])
    if stale:
        raise CopyscanError(
            f"{cfg.out} holds results of {len(stale)} chunk(s) from another build of {cfg.index} "
            f"(index rebuilt since); use mode=overwrite to rescan"
        )
    todo = [c for c in chunks if c.chunk not in done]
    settings = cfg.search_settings(manifest)
    logger.info(
        "scan: %d query chunk(s), %d already done%s; index %s (%s vectors, %s); %d candidates per index "
        "shard (%s), nprobe %s (%s)",
        len(chunks),
        len(done),
        " (resumed)" if resumed else "",
        cfg.index,
        f"{manifest['ntotal']:,}",
        manifest["index"]["factory"],
        settings["candidates"],
        settings["candidates_from"],
        settings["nprobe"] or "of the shards",
        settings["nprobe_from"],
    )

    embedder = manifest["embedder"]["name"]
    weights = cfg.weights if cfg.weights is not None else manifest["config"].get("weights")
    options = manifest["config"].get("embedder_options") or {}
    spec = ray.get(embedder_spec_remote.options(num_cpus=cfg.decode_cpus).remote(embedder, weights, options))
    check_embedder(manifest, spec)
    threshold = resolve_threshold(manifest, cfg.threshold)
    if threshold is None and str(cfg.threshold) != "none":
        logger.warning(
            "scan: %s is not calibrated (or was rebuilt since); is_copy stays empty. Run `copyscan calibrate "
            "--index %s`, or pass threshold=somepalli / duplicate / a score_norm value",
            cfg.index,
            cfg.index,
        )
    elif threshold is not None:
        logger.info(
            "scan: is_copy = %s >= %.4f (%s)", threshold["column"], threshold["value"], threshold["source"]
        )

    radius = _radius(cfg, manifest)
    if radius is not None:
        settings["radius"] = {**radius, "max": cfg.radius_max, "margin": cfg.radius_margin}
        logger.info(
            "scan: every match with score_norm >= %.4f (%s), up to %d more than the top %d per query",
            radius["value"],
            radius["source"],
            cfg.radius_max,
            cfg.k,
        )
    local = local_windows(cfg, manifest)
    verify = _verifier(cfg, manifest, local)
    partial_threshold, why = resolve_partial_threshold(manifest, cfg, local is not None)
    if partial_threshold is not None:
        logger.info(
            "scan: is_partial_copy = %s >= %.4f on %s 0 (%s)",
            partial_threshold["column"],
            partial_threshold["value"],
            partial_threshold["rank"],
            partial_threshold["source"],
        )
    elif why is not None:  # a warning when asked for by name, else (implied by threshold) a note
        log = logger.warning if str(cfg.partial_threshold) else logger.info
        log("scan: is_partial_copy stays empty: %s", why)
    if local is not None:
        logger.info(
            "scan: partial copies: %d windows per query (at %d px) against %s region vectors (%d per image)",
            len(local.spec.boxes),
            local.spec.size,
            f"{local.manifest['ntotal']:,}",
            len(local.train_boxes),
        )
    failed: list[tuple[QueryChunk, str]] = []
    if todo:
        fanout = _Fanout(cfg, manifest, settings)
        if local is not None:
            local.fanout = _Fanout(
                cfg, local.manifest, cfg.search_settings(local.manifest), regions=True, k=cfg.region_hits
            )
        try:
            failed = _scan_chunks(
                cfg,
                todo,
                fanout,
                ScoreNormaliser(cfg.index, manifest, cfg.beta, so),
                embedder,
                weights,
                options,
                threshold,
                verify,
                local,
                radius,
                partial_threshold,
            )
        finally:
            fanout.close()
            if local is not None:
                local.fanout.close()

    markers = finished_chunks(cfg.out, so)
    seconds = time.time() - t0
    summary = {
        "index": cfg.index,
        "index_vectors": manifest["ntotal"],
        "index_build_id": manifest["build_id"],
        "index_factory": manifest["index"]["factory"],
        "embedder": manifest["embedder"]["name"],
        "queries_spec": cfg.queries,
        "k": cfg.k,
        "search": settings,  # re-rank depth and nprobe used, and where each came from
        "regions": local.describe() if local is not None else None,  # partial copies: windows, region index
        "threshold": threshold or {"name": str(cfg.threshold), "calibrated": False},
        "partial_threshold": partial_threshold
        or {"name": str(cfg.partial_threshold), "calibrated": False, "why": why},
        "extraction_delta": cfg.extraction_delta if cfg.verify_pixels else None,
        **summarize(markers),
        "chunks_total": len(chunks),
        "failed_chunks": [{"chunk": c.chunk, "source": c.describe(), "error": err} for c, err in failed],
        "this_run": {
            "chunks": len(todo),
            "seconds": round(seconds, 3),
            "queries_per_second": round(
                sum(markers[c.chunk]["queries"] for c in todo if c.chunk in markers) / seconds, 2
            )
            if seconds > 0
            else None,
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(layout.summary_url(cfg.out), summary, so)
    if failed:
        listing = "\n".join(f"  {c.describe()}: {err}" for c, err in failed)
        raise CopyscanError(f"{len(failed)} query chunk(s) failed; rerun to resume:\n{listing}")
    return summary


def _radius(cfg: ScanConfig, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What ``radius`` means for this index ({"name", "column", "value", "source"}), or None when off."""
    if str(cfg.radius) == "":
        return None
    radius = resolve_threshold(manifest, cfg.radius)
    if radius is None:
        raise CopyscanError(
            f"radius={cfg.radius}: {cfg.index} is not calibrated (or was rebuilt since); run `copyscan "
            f"calibrate --index {cfg.index}` or give a score_norm value"
        )
    return radius


@dataclass(frozen=True)
class ChunkVerifier:
    """What write_chunk runs on a chunk's matches before writing them: dense verification of the region
    candidates, then pixel verification of the top ranks (each None when off). Counts of both go into the
    chunk marker's ``verify``."""

    pixels: MatchVerifier | None = None
    dense: MatchVerifier | None = None

    def __call__(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        stats: dict[str, Any] = {}
        for verifier in (self.dense, self.pixels):
            if verifier is not None:
                table, counts = verifier(table)
                stats.update(counts)
        return table, stats


def _verifier(cfg: ScanConfig, manifest: dict[str, Any], local: LocalWindows | None) -> ChunkVerifier | None:
    """``verify`` for write_chunk: dense verification of the region candidates of local_rank <
    ``dense_verify`` and pixel verification of the top ``verify_pixels`` ranks; None when both are off."""
    if not cfg.verify_pixels and not cfg.dense_verify:
        return None
    if not any(str(e.get("source", "")).endswith(".tar") for e in manifest.get("embedding_shards", [])):
        logger.warning(
            "scan: %s holds no image shards (imported embeddings?); every verification will fail "
            "with train_no_source",
            cfg.index,
        )
    dense = None
    if cfg.dense_verify:
        if local is None:
            raise CopyscanError(
                f"dense_verify={cfg.dense_verify} verifies region candidates, but {cfg.index} has no region "
                "index (build it with regions=true) or regions=off"
            )
        spec = DenseSpec(
            ranks=cfg.dense_verify,
            weight=cfg.dense_weight,
            threads=cfg.verify_threads,
            limits=DecodeLimits(max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side),
        )
        logger.info(
            "scan: dense verification of the best %d region candidates per query (block-10 maps; the "
            "training image's longer side at %s of the query's shorter side); dense_score = "
            "local_score_norm + %g x dense_z",
            spec.ranks,
            ", ".join(f"{f:g}" for f in spec.fractions),
            spec.weight,
        )
        dense = MatchVerifier(manifest, cfg.index, spec, cfg.storage_options, verify_dense)
    if not cfg.verify_pixels:
        return ChunkVerifier(dense=dense)
    spec = VerifySpec(
        ranks=cfg.verify_pixels,
        size=cfg.verify_size,
        delta=cfg.extraction_delta,
        fit=cfg.verify_fit,
        threads=cfg.verify_threads,
        limits=DecodeLimits(max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side),
        neighbours=cfg.density_neighbours,
        alpha=cfg.density_alpha,
    )
    logger.info(
        "scan: pixel verification of the top %d match(es) per query at %d px, extracted = tiled l2 < %g",
        spec.ranks,
        spec.size,
        spec.delta,
    )
    if spec.neighbours:
        logger.info(
            "scan: density_l2 = pixel l2 / (%g x mean pixel l2 to the query's top %d matches, fetched too)",
            spec.alpha,
            spec.neighbours,
        )
    return ChunkVerifier(MatchVerifier(manifest, cfg.index, spec, cfg.storage_options), dense)


class _VerifiedWrites:
    """``write_chunk`` with verification (pixels, dense), as one Ray task of ``verify_cpus`` CPUs per chunk.

    The driver goes on with the next chunks while earlier ones are verified. A task verifies its chunk's
    matches (in batches, decoding in threads) and only then writes the chunk's files and, last, its marker
    with the verification counts, so resume counts a chunk as done only once it is verified. At most
    ``verify_in_flight`` tasks run at once; beyond that the driver waits, and the embedding with it.
    """

    def __init__(self, cfg: ScanConfig, verify: ChunkVerifier, on_written: Callable[[dict[str, Any]], None]):
        cpus = float(ray.cluster_resources().get("CPU", 1))
        in_flight = cfg.verify_in_flight or max(1, int(2 * cpus / cfg.verify_cpus))
        self.verify_ref = ray.put(verify)  # once, not per chunk: the manifest inside can be large
        remote = ray.remote(write_chunk).options(num_cpus=cfg.verify_cpus)
        self.stream: TaskStream[tuple[QueryChunk, inspect.BoundArguments]] = TaskStream(
            lambda item: remote.remote(*item[1].args, **item[1].kwargs),
            max_in_flight=in_flight,
            retries=cfg.retries,
            on_result=lambda item, marker: on_written(marker),
            describe=lambda item: f"verifying {item[0].describe()}",
            keep_results=False,
        )
        logger.info(
            "scan: verification in Ray tasks of %g CPU, at most %d at once", cfg.verify_cpus, in_flight
        )

    def __call__(self, chunk: QueryChunk, *args, **kwargs) -> None:
        """Submit ``write_chunk(*args, **kwargs)`` for ``chunk``, verifying with this scan's verifier."""
        bound = inspect.signature(write_chunk).bind(*args, **kwargs)
        bound.arguments["verify"] = self.verify_ref
        self.stream.add((chunk, bound))
        self.stream.poll()

    def finish(self) -> list[tuple[QueryChunk, str]]:
        """Wait for every task; the chunks whose verification or write failed for good, with the error."""
        return [(chunk, error) for (chunk, _), error in self.stream.finish().failed]


def _scan_chunks(
    cfg: ScanConfig,
    todo: list[QueryChunk],
    fanout: _Fanout,
    normalise: ScoreNormaliser,
    embedder: str,
    weights: str | None,
    options: dict,
    threshold: dict | None,
    verify: ChunkVerifier | None = None,
    local: LocalWindows | None = None,
    radius: dict[str, Any] | None = None,
    partial_threshold: dict[str, Any] | None = None,
) -> list[tuple[QueryChunk, str]]:
    so = cfg.storage_options
    limits = DecodeLimits(max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side)
    num_actors, num_gpus = embed_pool_size(cfg.embed_actors, cfg.embed_actor_gpus)
    progress = Progress("scan", len(todo), unit="chunks", item="queries")
    failed: list[tuple[QueryChunk, str]] = []

    def written(marker: dict[str, Any]) -> None:
        progress.update(1, marker["queries"])

    verified_writes = _VerifiedWrites(cfg, verify, written) if verify is not None else None

    def write(chunk: QueryChunk, *args, **kwargs) -> None:
        if verified_writes is None:
            written(write_chunk(*args, **kwargs))
        else:  # verified, then written, by a Ray task; progress when it is done
            verified_writes(chunk, *args, **kwargs)

    def make_actor():
        return make_embed_actor(
            embedder=embedder,
            weights=weights,
            options=options,
            num_cpus=cfg.embed_actor_cpus,
            num_gpus=num_gpus,
            concurrency=cfg.embed_concurrency,
            torch_threads=cfg.torch_threads,
            decode_cpus=cfg.decode_cpus,
            storage_options=so,
        )

    windows = local.spec if local is not None else None
    aligned = local.aligned if local is not None else None
    crops = local is not None and local.crops  # frames or sliding windows cut from the queries

    def submit(actor, chunk: QueryChunk):
        if chunk.kind == "tar":
            return actor.embed_tar.remote(chunk.urls[0], cfg.batch_size, limits, windows, aligned, crops)
        return actor.embed_images.remote(
            chunk.urls, chunk.keys, cfg.batch_size, limits, windows, aligned, crops
        )

    def search_global(x: np.ndarray) -> ShardResult:
        """x: (n, d) raw descriptors (queries, or crops of them) → merged top k with score_norm."""
        hits = fanout.search(x)
        hits.D_norm = normalise(x, hits.D, hits.I)
        return hits

    def search_queries(x: np.ndarray) -> tuple[ShardResult, dict[str, int] | None]:
        """The chunk's own queries: ``search_global``, and with ``radius`` every further match of score_norm
        >= radius (search/ann/radius.py) with the counts for the chunk marker."""
        if radius is None:
            return search_global(x), None
        above = Above(radius["value"] + normalise.floor(x), cfg.radius_max, cfg.radius_margin)
        hits = fanout.search(x, above)
        hits.D_norm = normalise(x, hits.D, hits.I)
        hits = keep_above(hits, cfg.k, radius["value"])
        return hits, radius_counts(hits, cfg.k, above)

    def on_result(chunk: QueryChunk, embedded: EmbeddedSource, actor: Any) -> None:
        t0 = time.perf_counter()
        if chunk.kind == "tar":
            # a query's source is its shard (the sample's JSON url, if any, is not where its bytes are):
            # what pixel verification and reports re-read it from, with query_id as the key
            embedded.records = [{**r, "url": chunk.urls[0]} for r in embedded.records]
        try:
            local_result = None
            radius_marker = None
            if len(embedded.records):
                result, radius_marker = search_queries(embedded.xb)
                if local is not None:
                    local_result = local.search(embedded.x_regions)
                if crops:  # the query crops are embedded by the actor that embedded the chunk
                    local_result = local.refine_result(
                        local_result,
                        embedded.region_pixels,
                        lambda pixels, boxes: ray.get(actor.embed_crops_each.remote(pixels, boxes)),
                        search_global,
                        [(r["width"], r["height"]) for r in embedded.records],
                    )
                    embedded.region_pixels = None
                if aligned is not None:
                    result.split = local.split_scores(embedded.x_aligned, result.I)
                    local_result.split = local.split_scores(embedded.x_aligned, local_result.I)
            else:
                empty = np.zeros((0, cfg.k), dtype=np.float32)
                result = ShardResult(empty, empty.astype(np.int64), empty, {}, empty)
            write(
                chunk,
                cfg.out,
                chunk.chunk,
                embedded.xb,
                embedded.records,
                embedded.rejections,
                result,
                {
                    "source": chunk.describe(),
                    "index_build_id": fanout.manifest["build_id"],
                    "search_seconds": round(time.perf_counter() - t0, 3),
                    "embed_seconds": round(embedded.embed_seconds, 3),
                    "radius": radius_marker,  # None: top k only
                },
                so,
                threshold,
                verify,
                local=local_result,
                partial_threshold=partial_threshold,
            )
        except (CopyscanError, RayActorError, OSError) as exc:
            logger.error("%s failed: %s", chunk.describe(), exc)
            failed.append((chunk, f"{type(exc).__name__}: {exc}"))

    outcome = run_pool(
        make_actor,
        num_actors,
        todo,
        submit,
        per_actor=cfg.embed_concurrency,
        retries=cfg.retries,
        on_result=on_result,
        describe=QueryChunk.describe,
        with_actor=True,
        keep_results=False,  # on_result wrote each chunk; its vectors (and windows) need not stay in memory
    )
    if verified_writes is not None:
        failed += verified_writes.finish()
    return failed + list(outcome.failed)
