"""The index job on Ray: embed every shard (resumable), plan, train once, fill index shards, manifest.

Call ``run_index`` after ``ray.init`` (``jobs/index.py`` does both). Each phase skips what an earlier
run finished: shards with a stats marker, a written ``trained.index``, index shards with a marker
(``copyscan.indexing.runtime.resumable.run_stage`` runs the embed, import and fill stages).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import ray

from copyscan.indexing.build.ivf import fill_index_shard, index_shard_marker, train_phase
from copyscan.indexing.build.merge_shards import keep_merged_layout
from copyscan.indexing.build.planner import IndexPlan, plan_index
from copyscan.indexing.embed import clip_import
from copyscan.indexing.embed.decode import DecodeLimits, PairSpec, pair_quota
from copyscan.indexing.embed.decode_ray import start_decode_workers
from copyscan.indexing.embed.embed_ray import embed_pool, embedder_spec, make_embed_actor
from copyscan.indexing.embed.fanout import MAX_IN_FLIGHT, DecodeFanout
from copyscan.indexing.embed.stage import finished_shards
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.models import clip
from copyscan.indexing.models.embedder import spec_fingerprint
from copyscan.indexing.models.regions import RegionSpec, parse_grid
from copyscan.indexing.read.shardlist import expand_shards
from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.config import to_dict
from copyscan.indexing.runtime.pool_ray import run_tasks
from copyscan.indexing.runtime.progress import timed
from copyscan.indexing.runtime.resumable import Item, Stage, run_stage
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.lease import Lease
from copyscan.indexing.store.manifest import build_manifest
from copyscan.indexing.store.outputs import claim_output, output_lease

logger = logging.getLogger("copyscan")

EMBED = Stage("embed", "shard", "images", source=str)
IMPORT = Stage("import", "part", "vectors", source=lambda part: part[0])
FILL = Stage("fill", "index shard", "vectors", count_field="ntotal")

_train = ray.remote(train_phase)
_fill = ray.remote(fill_index_shard)
_import = ray.remote(clip_import.import_part)


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Run (or resume) the whole index job, holding the lease on ``OUT`` (``indexing/store/lease.py``);
    return the manifest written to ``OUT/manifest.json``."""
    with output_lease(cfg.out, "index", layout.CONFIG_NAME, cfg.storage_options) as lease:
        return _run_index(cfg, lease)


def _run_index(cfg: IndexConfig, lease: Lease) -> dict[str, Any]:
    t_start = time.time()
    timings: dict[str, float] = {}
    parts, shards = _sources(cfg)
    logger.info("index: %d shards from %s -> %s", len(shards), cfg.shards, cfg.out)
    resumed = claim_output(
        cfg.out, layout.CONFIG_NAME, to_dict(cfg), cfg.mode, IndexConfig.RESUME_KEYS, cfg.storage_options
    )
    if resumed:
        logger.info("index: resuming the run already in %s", cfg.out)
    spec = _embedder_spec(cfg, shards)
    fingerprint = spec_fingerprint(spec)
    if cfg.regions:  # refuse an embedder input that regions cannot be cut from before any shard is embedded
        RegionSpec((), size=cfg.region_size, mode=cfg.region_mode).preprocess_spec(spec["preprocess"])

    with timed("embed", timings):
        if parts is not None:
            stats = _import_all(cfg, parts, fingerprint, int(spec["dim"]))
        else:
            stats = _embed_all(cfg, shards, fingerprint)
    counts = {shard: int(s["count"]) for shard, s in stats.items()}
    plan = _plan(cfg, counts, int(spec["dim"]), cfg.index_factory, cfg.nprobe)
    logger.info(
        "index: %s over %d vectors in %d index shard(s)",
        plan.factory,
        sum(counts.values()),
        len(plan.shard_groups),
    )
    with timed("train", timings):
        train_info = _train_once(cfg, plan, counts, cfg.out)
    with timed("fill", timings):
        markers = _fill_all(cfg, plan, cfg.out)
    regions = None
    if cfg.regions:
        with timed("regions", timings):
            regions = _region_index(cfg, shards, stats, spec, t_start, plan.factory)

    manifest = build_manifest(
        cfg=to_dict(cfg),
        shards=shards,
        stats=stats,
        spec=spec,
        plan=plan,
        markers=markers,
        train_info=train_info,
        timings=timings,
        started_at=t_start,
    )
    manifest["regions"] = regions
    lease.check()
    return _write_manifest(cfg, manifest)


def _sources(cfg: IndexConfig) -> tuple[list[tuple[str, str]] | None, list[str]]:
    """(clip-retrieval parts as (embeddings, metadata) URLs, or None, the embedding shards' sources): an
    imported index (precomputed vectors: no images, no model) has parts, and its sources are their
    embedding files; an index of images has tar URLs."""
    if cfg.embedder == clip.NAME:
        parts = clip_import.list_parts(cfg.shards, cfg.storage_options)
        return parts, [emb for emb, _ in parts]
    return None, expand_shards(cfg.shards, cfg.storage_options)


def _embedder_spec(cfg: IndexConfig, shards: list[str]) -> dict[str, Any]:
    """The embedder's spec: of an import, from its first part's dimension; else ``embedder_spec``'s."""
    if cfg.embedder == clip.NAME:
        shape = clip_import.npy_shape(shards[0], cfg.storage_options)
        return clip.clip_spec(cfg.embedder_options, shape[-1])
    return embedder_spec(cfg.embedder, cfg.weights, cfg.embedder_options, cfg.decode_cpus)


def _write_manifest(cfg: IndexConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``OUT/manifest.json`` (keeping a merge's layout and, for the same build, when and how fast it
    was built) and return what was written."""
    so = cfg.storage_options
    manifest_url = storage.join(cfg.out, layout.MANIFEST_NAME)
    if storage.exists(manifest_url, so):
        # A rerun of a finished index changes nothing: keep when and how fast it was built.
        previous = storage.read_json(manifest_url, so)
        manifest = keep_merged_layout(previous, manifest)
        if (
            previous.get("build_id") == manifest["build_id"]
            and previous.get("index_shards") == manifest["index_shards"]
        ):
            for key in ("created_at", "wall_seconds", "timings", "calibration"):
                if key in previous:
                    manifest[key] = previous[key]
    storage.write_json(manifest_url, manifest, so)
    logger.info("index: wrote %s", manifest_url)
    return manifest


def _plan(cfg: IndexConfig, counts: dict[int, int], dim: int, factory: str, nprobe: int) -> IndexPlan:
    """The index plan of ``counts`` vectors under ``cfg``'s limits (the index's and its region index's)."""
    return plan_index(
        counts,
        dim,
        factory=factory,
        flat_threshold=cfg.flat_threshold,
        max_shard_vectors=cfg.max_shard_vectors,
        max_code_bytes=cfg.max_code_bytes,
        nprobe=nprobe,
        shard_memory_bytes=cfg.shard_memory_bytes,
        recall_target=cfg.recall_target,
        whitened=cfg.whitening != "none",
    )


def pair_spec(cfg: IndexConfig, n_shards: int, shard: int) -> PairSpec | None:
    """Augmented copies for learned whitening (``pair_quota`` images of this shard), or None."""
    quota = pair_quota(cfg.whitening_pair_images, n_shards, shard) if cfg.whitening == "learned" else 0
    if quota == 0:
        return None
    return PairSpec(images=quota, copies=cfg.whitening_pair_copies, seed=cfg.seed, shard=shard)


def _region_spec(cfg: IndexConfig) -> RegionSpec | None:
    """The boxes every indexed image also gets a vector for, or None without ``regions``."""
    if not cfg.regions:
        return None
    return RegionSpec(tuple(parse_grid(cfg.region_grid)), size=cfg.region_size, mode=cfg.region_mode)


def _task_slots(cfg: IndexConfig) -> int:
    """CPU tasks of ``fill_cpus`` each that the cluster runs at once now (re-read by the task stream as
    nodes join); at least one, whose pending demand makes an autoscaler start a node."""
    return max(1, int(cluster_ray.alive()[0] // cfg.fill_cpus))


def _embed_all(cfg: IndexConfig, shards: list[str], fingerprint: str) -> dict[int, dict[str, Any]]:
    """Every tar shard → embedding shard, on a pool of embedding actors; finished ones are skipped."""
    done = finished_shards(cfg.out, cfg.storage_options)
    _check_embedded(cfg, shards, done, fingerprint)
    todo = len(shards) - len(done)
    size = embed_pool(todo, cfg.embed_actors, cfg.embed_actor_gpus, cfg.embed_actor_cpus, cfg.max_gpus)
    size = cluster_ray.leave_room(size, cfg.decode_cpus, what="embed")
    fanout = DecodeFanout(cfg.embed_concurrency, functools.partial(cluster_ray.decode_room, size))
    make_actor = functools.partial(
        make_embed_actor,
        embedder=cfg.embedder,
        weights=cfg.weights,
        options=cfg.embedder_options,
        num_cpus=cfg.embed_actor_cpus,
        num_gpus=size.num_gpus,
        concurrency=cfg.embed_concurrency or MAX_IN_FLIGHT,
        torch_threads=cfg.torch_threads,
        decode_cpus=cfg.decode_cpus,
        storage_options=cfg.storage_options,
    )
    limits = DecodeLimits(cfg.max_image_pixels, cfg.min_image_side, cfg.max_decode_seconds)
    submit = functools.partial(_submit_embed, cfg, len(shards), limits, _region_spec(cfg))
    runner = functools.partial(
        cluster_ray.run_growing_pool,
        size,
        "embed",
        make_actor,
        submit=submit,
        per_actor=fanout,
        start_timeout=cfg.actor_start_timeout,
    )
    items = list(enumerate(shards))
    start_decode_workers(min(todo, size() * fanout()), cfg.decode_cpus)
    return run_stage(
        EMBED, items, done, runner, retries=cfg.retries, report=fanout.reporting(_log_rejections)
    )


def _check_embedded(
    cfg: IndexConfig, shards: list[str], done: dict[int, dict[str, Any]], fingerprint: str
) -> None:
    """Refuse to resume from embedding shards of another shard list or another embedder."""
    for shard, s in done.items():
        if shard >= len(shards) or s.get("source") != shards[shard]:
            raise CopyscanError(
                f"{cfg.out} holds embeddings of shard {shard:05d} from {s.get('source')}, but this run's shard "
                f"{shard:05d} is {shards[shard] if shard < len(shards) else 'absent'}: the shard list changed. "
                "Use mode=overwrite or another output."
            )
        if s.get("embedder_fingerprint") != fingerprint:
            raise CopyscanError(
                f"shard {shard:05d} in {cfg.out} was embedded with a different embedder/weights "
                f"({s.get('embedder_fingerprint')} vs {fingerprint}); use mode=overwrite"
            )


def _submit_embed(
    cfg: IndexConfig, n_shards: int, limits: DecodeLimits, regions: RegionSpec | None, actor: Any, item: Item
) -> ray.ObjectRef:
    shard, url = item
    return actor.embed_shard.remote(
        cfg.out, shard, url, cfg.batch_size, limits, pair_spec(cfg, n_shards, shard), regions
    )


def _log_rejections(item: Item, stats: dict[str, Any]) -> None:
    if stats["rejected"]:
        logger.info(
            "embed: shard %05d rejected %d sample(s): %s",
            item[0],
            stats["rejected"],
            stats["rejected_by_reason"],
        )


def _import_all(
    cfg: IndexConfig, parts: list[tuple[str, str]], fingerprint: str, dim: int
) -> dict[int, dict[str, Any]]:
    """Precomputed clip-retrieval parts → embedding shards, in parallel CPU tasks; finished ones are skipped."""
    done = finished_shards(cfg.out, cfg.storage_options)
    for shard, s in done.items():
        if (
            shard >= len(parts)
            or s.get("source") != parts[shard][0]
            or s.get("embedder_fingerprint") != fingerprint
        ):
            raise CopyscanError(
                f"{cfg.out} holds shard {shard:05d} from {s.get('source')} with other settings: the input "
                "changed. Use mode=overwrite or another output."
            )
    submit = functools.partial(_submit_import, cfg, fingerprint, dim)
    runner = functools.partial(run_tasks, submit, max_in_flight=_task_slots(cfg))
    return run_stage(IMPORT, list(enumerate(parts)), done, runner, retries=cfg.retries)


def _submit_import(cfg: IndexConfig, fingerprint: str, dim: int, item: Item) -> ray.ObjectRef:
    shard, (emb_url, meta_url) = item
    return _import.options(num_cpus=cfg.fill_cpus).remote(
        cfg.out, shard, emb_url, meta_url, fingerprint, dim, cfg.storage_options
    )


def _train_once(
    cfg: IndexConfig, plan: IndexPlan, counts: dict[int, int], out: str, whitening_from: str | None = None
) -> dict[str, Any]:
    """Train the index at ``out`` (the output, or its region index) unless an earlier run did."""
    url = layout.trained_index_url(out, plan.factory)
    if storage.exists(url, cfg.storage_options):
        logger.info("train: %s exists, reusing it", url)
        return storage.read_json(layout.train_info_url(out, plan.factory), cfg.storage_options)
    gpus = cfg.train_gpus
    if gpus < 0:
        gpus = 1.0 if plan.factory.startswith("IVF") and cluster_ray.gpus_possible() else 0.0
    if gpus > 0:
        logger.info("train: the coarse k-means of %s on a task of %g GPU", plan.factory, gpus)
    return ray.get(
        _train.options(num_cpus=cfg.fill_cpus, num_gpus=gpus).remote(
            out,
            plan.factory,
            counts,
            train_size=plan.train_size,
            whitening=cfg.whitening,
            whitening_shrinkage=cfg.whitening_shrinkage,
            whitening_pca_shrinkage=cfg.whitening_pca_shrinkage,
            whitening_sample=cfg.whitening_sample,
            background_size=cfg.background_size,
            seed=cfg.seed,
            storage_options=cfg.storage_options,
            whitening_from=whitening_from,
            train_device=cfg.train_device,
        )
    )


def _fill_all(
    cfg: IndexConfig, plan: IndexPlan, out: str, density_per_image: int = 0
) -> dict[int, dict[str, Any]]:
    """Fill every index shard not yet filled (``density_per_image``: a region index's, with densities)."""
    done = _filled(cfg, plan, out, density_per_image)
    submit = functools.partial(_submit_fill, cfg, plan.factory, out, density_per_image)
    runner = functools.partial(run_tasks, submit, max_in_flight=_task_slots(cfg))
    return run_stage(FILL, list(enumerate(plan.shard_groups)), done, runner, retries=cfg.retries)


def _filled(cfg: IndexConfig, plan: IndexPlan, out: str, density_per_image: int) -> dict[int, dict[str, Any]]:
    """Markers of the index shards an earlier run filled from the same group, with densities iff asked."""
    done: dict[int, dict[str, Any]] = {}
    for j, group in enumerate(plan.shard_groups):
        marker = index_shard_marker(out, plan.factory, j, cfg.storage_options)
        if (
            marker is not None
            and marker.get("embedding_shards") == group
            and bool(marker.get("density")) == bool(density_per_image)
        ):
            done[j] = marker
    return done


def _submit_fill(
    cfg: IndexConfig, factory: str, out: str, density_per_image: int, item: Item
) -> ray.ObjectRef:
    index_shard, group = item
    return _fill.options(num_cpus=cfg.fill_cpus).remote(
        out, factory, index_shard, group, cfg.whitening != "none", cfg.storage_options, density_per_image
    )


def _region_index(
    cfg: IndexConfig,
    shards: list[str],
    stats: dict[int, dict[str, Any]],
    spec: dict[str, Any],
    started_at: float,
    global_factory: str,
) -> dict[str, Any]:
    """Plan, train and fill the region index from the region vectors the embedding phase wrote, write its
    manifest (``OUT/regions/manifest.json``, the same format as the index's) and return what the index's
    manifest says about it."""
    root = layout.regions_root(cfg.out)
    described = _regions_described(cfg)
    per_image = described["per_image"]
    region_stats = _region_stats(cfg, stats, per_image)
    counts = {s: st["count"] for s, st in region_stats.items()}
    plan = _plan(cfg, counts, int(spec["dim"]), cfg.region_factory, nprobe=0)
    logger.info(
        "regions: %s over %d region vectors (%d per image) in %d index shard(s)",
        plan.factory,
        sum(counts.values()),
        per_image,
        len(plan.shard_groups),
    )
    timings: dict[str, float] = {}
    with timed("train", timings):
        # the index's whitening (learned from whole images and their copies): query windows are crops
        train_info = _train_once(cfg, plan, counts, root, layout.whitening_url(cfg.out, global_factory))
    with timed("fill", timings):
        markers = _fill_all(cfg, plan, root, density_per_image=per_image)
    sub = build_manifest(
        cfg={**to_dict(cfg), "out": root},
        shards=shards,
        stats=region_stats,
        spec=spec,
        plan=plan,
        markers=markers,
        train_info=train_info,
        timings=timings,
        started_at=started_at,
    )
    for entry in sub["embedding_shards"]:  # image metadata and stats live in the index's own files
        entry["metadata"] = None
        entry["stats"] = None
    sub["kind"] = "regions"
    sub["regions_of"] = described
    storage.write_json(storage.join(root, layout.MANIFEST_NAME), sub, cfg.storage_options)
    return {
        **described,
        "manifest": f"{layout.REGIONS_DIR}/{layout.MANIFEST_NAME}",
        "build_id": sub["build_id"],
        "ntotal": sub["ntotal"],
        "factory": plan.factory,
        "ann_bytes_per_image": plan.ann_bytes * per_image,
        "index_bytes": sum(int(e["bytes"]) for e in sub["index_shards"]),
    }


def _regions_described(cfg: IndexConfig) -> dict[str, Any]:
    """The region index's boxes and query windows, as both manifests describe them."""
    boxes = parse_grid(cfg.region_grid)
    return {
        "per_image": len(boxes),
        "boxes": [list(b) for b in boxes],
        "grid": cfg.region_grid,
        "mode": cfg.region_mode,
        "size": cfg.region_size if cfg.region_mode == "crop" else None,
        "query_grid": cfg.region_query_grid,
        "query_size": cfg.region_query_size,
        "id_scheme": "shard << 32 | (row * per_image + box)",
    }


def _region_stats(
    cfg: IndexConfig, stats: dict[int, dict[str, Any]], per_image: int
) -> dict[int, dict[str, Any]]:
    """The region vectors of every embedding shard, as ``build_manifest`` reads an embedding shard's stats."""
    missing = [s for s in sorted(stats) if (stats[s].get("regions") or {}).get("per_image") != per_image]
    if missing:
        raise CopyscanError(
            f"embedding shard(s) {missing[:5]} of {cfg.out} hold no region vectors of {per_image} boxes; "
            "use mode=overwrite to embed them again"
        )
    return {
        s: {
            "count": int(st["regions"]["count"]),
            "samples": int(st["regions"]["count"]),
            "rejected": 0,
            "rejected_by_reason": {},
            "id_range": st["regions"]["id_range"],
        }
        for s, st in stats.items()
    }
