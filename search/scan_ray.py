"""The scan job on Ray: scan actors over the index shards, the fan-out of each query block over them, and
the embedding actor pool that feeds the chunk steps.

Scan actors each own a set of index shards (downloaded once into a local cache and memory-mapped, never
re-fetched per chunk) and return exact re-ranked top-k lists; the driver merges them with a heap. A query
chunk's path (``search/scan_steps.py``): embedded by embedding actors in pieces (``EmbedStep``,
``search/scan_pieces.py``), then searched (``SearchStep``), region-matched (``RegionsStep``) and written
(``WriteStep``, verified first in Ray tasks when the scan verifies: ``search/scan_writes_ray.py``) in a stage
thread (``indexing/runtime/stages.py``), several chunks at once, while the embedding actors run ahead on the
next pieces. ``run_scan``: prepare (``search/scan.py``) → run the steps over the chunks → write the summary
(``search/scan_summary.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import ray
from ray.exceptions import RayActorError

from copyscan.indexing.embed.decode_ray import start_decode_workers
from copyscan.indexing.embed.embed_ray import embed_pool, embedder_spec, make_embed_actor
from copyscan.indexing.embed.fanout import MAX_IN_FLIGHT, MIN_IN_FLIGHT, DecodeFanout
from copyscan.indexing.embed.stage import EmbeddedSource
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.progress import Progress
from copyscan.indexing.runtime.stages import Stages
from copyscan.indexing.store import layout
from copyscan.indexing.store.outputs import output_lease
from copyscan.search.ann.normalise import ScoreNormaliser, whiten
from copyscan.search.ann.radius import Above
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.ann.topk import ShardResult, carry_values, merge_sorted_with, merge_topk
from copyscan.search.regions.searcher import RegionSearcher
from copyscan.search.scan import ScanSetup, prepare_scan
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_pieces import Assembly, Piece, most_pieces, plan_pieces
from copyscan.search.scan_steps import (
    ChunkScan,
    EmbedStep,
    Failures,
    RegionsStep,
    SearchStep,
    WriteStep,
    chunk_written,
)
from copyscan.search.scan_summary import raise_if_failed, write_summary
from copyscan.search.scan_writes_ray import VerifiedWrites

logger = logging.getLogger("copyscan")


class ScanWorker:
    """Actor body: a ShardSearcher over some index shards (a RegionSearcher over region index shards when
    ``regions``: ``manifest`` is then the region index's), its coarse assignment on ``device``
    (ScanConfig.search_device: a GPU when the actor holds one and ``auto``)."""

    def __init__(
        self,
        index_url: str,
        manifest: dict[str, Any],
        index_shards: list[int],
        cache_dir: str,
        storage_options,
        regions: bool = False,
        density_beta: float = 0.0,
        device: str = "cpu",
    ):
        if regions:
            self.searcher = RegionSearcher(
                index_url, manifest, index_shards, cache_dir, storage_options, density_beta, device
            )
        else:
            self.searcher = ShardSearcher(
                index_url, manifest, index_shards, cache_dir, storage_options, device=device
            )

    def ready(self) -> tuple[int, str]:
        """The vectors this actor holds, and where its coarse assignment runs (``cpu``, ``faiss-gpu``,
        ``torch:cuda``, ...): one call, so that an actor lost after it answered is not asked again."""
        return self.searcher.ntotal, self.searcher.device

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


class Fanout:
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
        wanted = cfg.scan_actors or max(1, int(cluster_ray.alive()[0] // 2))
        self.groups = assign_shards(manifest, wanted)
        self._restarting = threading.Lock()
        self.actors = [self._start(g) for g in self.groups]
        started = self._wait_ready()
        logger.info(
            "scan: %d %sscan actor(s) hold %s vectors: %s; coarse assignment on %s",
            len(self.actors),
            "region " if regions else "",
            f"{sum(n for n, _ in started):,}",
            self.groups,
            ", ".join(sorted({device for _, device in started})),
        )

    def _wait_ready(self) -> list[tuple[int, str]]:
        """Each actor's ``ready()`` (vector count, coarse-assignment device) once all have started (on an
        autoscaling cluster their pending demand starts the nodes they need; an actor whose node is lost
        meanwhile is started again; one lost after it answered is restarted by the first search that
        finds it gone); CopyscanError after ``actor_start_timeout`` seconds."""
        deadline = time.monotonic() + self.cfg.actor_start_timeout
        answers: list[tuple[int, str] | None] = [None] * len(self.actors)
        while None in answers:
            refs = {self.actors[i].ready.remote(): i for i, n in enumerate(answers) if n is None}
            ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=deadline - time.monotonic())
            for ref in ready:
                try:
                    answers[refs[ref]] = ray.get(ref)
                except RayActorError:
                    logger.warning("scan: a scan actor died while starting; starting it again")
                    self.actors[refs[ref]] = self._start(self.groups[refs[ref]])
            if waiting and time.monotonic() >= deadline:
                self.close()
                raise CopyscanError(
                    f"{len(waiting)} of {len(self.actors)} scan actor(s) of {self.cfg.scan_actor_cpus:g} CPU could "
                    f"not start in {self.cfg.actor_start_timeout:.0f} s: the cluster has no room for them and its "
                    "autoscaler (if any) started no node; lower scan_actors or raise actor_start_timeout"
                )
        return [(int(n), str(device)) for n, device in answers]

    def _start(self, group: list[int]):
        return (
            ray.remote(ScanWorker)
            .options(num_cpus=self.cfg.scan_actor_cpus, num_gpus=self.cfg.scan_actor_gpus)
            .remote(
                self.cfg.index,
                self.manifest,
                group,
                self.cfg.cache_dir,
                self.cfg.storage_options,
                self.regions,
                self.cfg.region_density_beta if self.regions else 0.0,
                self.cfg.search_device,
            )
        )

    def search(self, xq: np.ndarray, above: Above | None = None) -> ShardResult:
        """Top k of every query from all actors, merged; with ``above``, followed by each query's further
        matches of score >= above.lo (``copyscan.search.ann.radius``)."""
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
        with self._restarting:  # chunks in several stage threads may find the same actor dead
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
    """Run (or resume) a scan; returns the summary written to ``OUT/summary.json``. The run holds the lease
    on ``OUT`` throughout (a second writer is refused: ``indexing/store/lease.py``)."""
    started = time.time()
    with output_lease(cfg.out, "scan", layout.RUN_CONFIG_NAME, cfg.storage_options) as lease:
        setup = prepare_scan(cfg, functools.partial(_embedder_spec, cfg.decode_cpus))
        failed = _scan(setup) if setup.todo else []
        lease.check()
        summary = write_summary(setup, failed, started)
    raise_if_failed(failed)
    return summary


def _embedder_spec(
    decode_cpus: float, name: str, weights: str | None, options: dict[str, Any]
) -> dict[str, Any]:
    """The query embedder's spec (``embedder_spec``: here, or on a worker when it has a weights file)."""
    return embedder_spec(name, weights, options, decode_cpus)


def _scan(setup: ScanSetup) -> Failures:
    """Scan the chunks to do with scan actors over the index (and its region index); the chunks that failed.

    The first embedding actor starts before the scan actors are waited for, so that the two start (load
    the model; load the index) side by side, and so do the first decode tasks' workers."""
    cfg = setup.cfg
    max_pieces = most_pieces(setup.todo, cfg.batch_size)
    size = embed_pool(  # at most one actor per piece (search/scan_pieces.py)
        max_pieces, cfg.embed_actors, cfg.embed_actor_gpus, cfg.embed_actor_cpus, cfg.max_gpus
    )
    start_decode_workers(min(max_pieces, size() * (cfg.embed_concurrency or MIN_IN_FLIGHT)), cfg.decode_cpus)
    make_actor = Prestarted(functools.partial(_embed_actor, setup, size.num_gpus))
    index = Fanout(cfg, setup.manifest, setup.settings)
    region_index = None
    try:
        if setup.local is not None:
            region_settings = cfg.search_settings(setup.local.manifest)
            region_index = Fanout(cfg, setup.local.manifest, region_settings, regions=True, k=cfg.region_hits)
        scan_actors = len(index.actors) + (len(region_index.actors) if region_index is not None else 0)
        reserved = scan_actors * cfg.scan_actor_cpus  # the embedding pool and its decode tasks leave them
        size = cluster_ray.leave_room(size, cfg.decode_cpus, reserved, "scan: embed")
        return _run_steps(setup, index, region_index, size, reserved, make_actor)
    finally:
        make_actor.close()
        index.close()
        if region_index is not None:
            region_index.close()


class Prestarted:
    """``run_pool``'s ``make_actor`` whose first actor is started at once, before the pool runs; ``close``
    kills that actor if the pool never took it."""

    def __init__(self, make_actor: Callable[[], Any]) -> None:
        self.make_actor = make_actor
        self.first = make_actor()

    def __call__(self) -> Any:
        actor, self.first = self.first, None
        return actor if actor is not None else self.make_actor()

    def close(self) -> None:
        if self.first is not None:
            ray.kill(self.first, no_restart=True)
            self.first = None


def _run_steps(
    setup: ScanSetup,
    index: Fanout,
    region_index: Fanout | None,
    size: cluster_ray.PoolSize,
    reserved_cpus: float,
    make_actor: Callable[[], Any],
) -> Failures:
    """Every chunk to do through embed → search → (regions) → write: an embedding actor pool (run_pool)
    embeds the chunks' pieces (``plan_pieces``: every actor has work, the run's tail is cut finer); each
    chunk whose pieces are all in goes through ``ChunkScan`` in a stage thread while the pool goes on;
    verified writes run in Ray tasks meanwhile. Returns the chunks that failed (steps, verified writes,
    then embedding). ``reserved_cpus``: the scan actors', which the decode tasks leave alone."""
    cfg = setup.cfg
    room = functools.partial(cluster_ray.decode_room, size, reserved_cpus=reserved_cpus)
    fanout = DecodeFanout(cfg.embed_concurrency, room, "scan: embed", unit="query piece")
    plan = plan_pieces(setup.todo, size(), fanout(), cfg.batch_size)
    assembly = Assembly(plan)
    embed = EmbedStep.of(setup)
    normalise = ScoreNormaliser(cfg.index, setup.manifest, cfg.beta, cfg.storage_options)
    search = SearchStep(index, normalise, cfg.k, setup.radius, cfg.radius_max, cfg.radius_margin)
    stages = Stages(cfg.stage_threads or (lambda: fanout() * size()), "scan-stage")
    written = stages.locked(
        functools.partial(chunk_written, Progress("scan", len(setup.todo), unit="chunks", item="queries"))
    )
    verified = VerifiedWrites(cfg, setup.verify, written) if setup.verify is not None else None
    chunk_scan = ChunkScan(
        search=search,
        regions=RegionsStep(setup.local, region_index, search) if setup.local is not None else None,
        write=WriteStep.of(setup, written, stages.locked(verified) if verified is not None else None),
        build_id=setup.manifest["build_id"],
        errors=(CopyscanError, RayActorError, OSError),
    )

    def embedded(piece: Piece, source: EmbeddedSource, actor: Any) -> None:
        """A piece is in; its chunk, once whole, goes to search → regions → write in a stage thread (its
        crops embedded by the actor of its last piece) while the pool goes on feeding the actors."""
        fanout.add(
            len(source.records),
            source.decode_task_seconds,
            source.decode_task_cpu_seconds,
            source.actor_model,
        )
        whole = assembly.add(piece, source)
        if whole is not None:
            stages.submit(chunk_scan, piece.chunk, whole, _crop_embedder(actor))

    try:
        outcome = cluster_ray.run_growing_pool(
            size,
            "scan: embed",
            make_actor,
            [piece for pieces in plan for piece in pieces],
            lambda actor, piece: embed(actor, piece.queries),
            start_timeout=cfg.actor_start_timeout,
            per_actor=fanout,
            retries=cfg.retries,
            on_result=embedded,
            describe=Piece.describe,
            with_actor=True,
            keep_results=False,  # the stages wrote each chunk; its vectors (and windows) are not kept
            before_close=stages.finish,  # the stages' crops are embedded by the pool's actors
        )
    finally:
        stages.close()
    logger.info(
        "scan: %d chunk(s) embedded in %d piece(s); at most %d chunk(s) searched and written at once",
        len(plan),
        sum(len(pieces) for pieces in plan),
        stages.peak,
    )
    failed = chunk_scan.failed + (verified.finish() if verified is not None else [])
    return failed + Assembly.failed_chunks(outcome.failed)


def _embed_actor(setup: ScanSetup, num_gpus: float) -> Any:
    """A new embedding actor for the scan's queries (run_pool's ``make_actor``)."""
    cfg = setup.cfg
    return make_embed_actor(
        embedder=setup.embedder,
        weights=setup.weights,
        options=setup.embedder_options,
        num_cpus=cfg.embed_actor_cpus,
        num_gpus=num_gpus,
        concurrency=cfg.embed_concurrency or MAX_IN_FLIGHT,  # crops come on top (_crop_embedder)
        torch_threads=cfg.torch_threads,
        decode_cpus=cfg.decode_cpus,
        storage_options=cfg.storage_options,
    )


def _crop_embedder(actor: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Crops of a chunk's query pixels embedded by ``actor``, the actor that embedded the chunk (it holds
    the model): ``embed_crops_each``, waited for."""
    return functools.partial(_embed_crops_each, actor)


def _embed_crops_each(actor: Any, pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    return ray.get(actor.embed_crops_each.remote(pixels, boxes))
