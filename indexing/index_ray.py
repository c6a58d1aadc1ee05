"""The index job on Ray: embed every shard (resumable), plan, train once, fill index shards, manifest.

Call ``run_index`` after ``ray.init`` (``jobs/index.py`` does both). Each phase skips what an earlier
run finished: shards with a stats marker, a written ``trained.index``, index shards with a marker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from indexing.build.ivf import fill_index_shard, index_shard_marker, train_phase
from indexing.build.merge_shards import keep_merged_layout
from indexing.build.planner import IndexPlan, plan_index
from indexing.embed import clip_import
from indexing.embed.decode import DecodeLimits, PairSpec, pair_quota
from indexing.embed.embed_ray import embed_pool_size, embedder_spec_remote, make_embed_actor
from indexing.embed.stage import finished_shards
from indexing.errors import CopyscanError
from indexing.index_config import IndexConfig
from indexing.models import clip
from indexing.models.embedder import spec_fingerprint
from indexing.models.regions import RegionSpec, parse_grid
from indexing.read.shardlist import expand_shards
from indexing.runtime.config import to_dict
from indexing.runtime.pool_ray import run_pool, run_tasks
from indexing.runtime.progress import Progress, timed
from indexing.store import layout, storage
from indexing.store.manifest import build_manifest
from indexing.store.outputs import claim_output

logger = logging.getLogger("copyscan")


_train = ray.remote(train_phase)
_fill = ray.remote(fill_index_shard)


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Run (or resume) the whole index job; return the manifest written to ``OUT/manifest.json``."""
    so = cfg.storage_options
    t_start = time.time()
    timings: dict[str, float] = {}
    imported = cfg.embedder == clip.NAME  # precomputed vectors: no images, no model
    if imported:
        parts = clip_import.list_parts(cfg.shards, so)
        shards = [emb for emb, _ in parts]
    else:
        shards = expand_shards(cfg.shards, so)
    logger.info("index: %d shards from %s -> %s", len(shards), cfg.shards, cfg.out)
    resumed = claim_output(cfg.out, layout.CONFIG_NAME, to_dict(cfg), cfg.mode, IndexConfig.RESUME_KEYS, so)
    if resumed:
        logger.info("index: resuming the run already in %s", cfg.out)

    if imported:
        shape = clip_import.npy_shape(shards[0], so)
        spec = clip.clip_spec(cfg.embedder_options, shape[-1])
    else:
        spec = ray.get(
            embedder_spec_remote.options(num_cpus=cfg.decode_cpus).remote(
                cfg.embedder, cfg.weights, cfg.embedder_options
            )
        )
    fingerprint = spec_fingerprint(spec)
    if cfg.regions:  # refuse an embedder input that regions cannot be cut from before any shard is embedded
        RegionSpec((), size=cfg.region_size, mode=cfg.region_mode).preprocess_spec(spec["preprocess"])

    with timed("embed", timings):
        if imported:
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
    logger.info("index: wrote %s", storage.join(cfg.out, layout.MANIFEST_NAME))
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


def _embed_all(cfg: IndexConfig, shards: list[str], fingerprint: str) -> dict[int, dict[str, Any]]:
    so = cfg.storage_options
    done = finished_shards(cfg.out, so)
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
    todo = [(i, url) for i, url in enumerate(shards) if i not in done]
    logger.info("embed: %d of %d shards already done, %d to go", len(done), len(shards), len(todo))
    if not todo:
        return done

    num_actors, num_gpus = embed_pool_size(cfg.embed_actors, cfg.embed_actor_gpus)
    limits = DecodeLimits(max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side)
    regions = (
        RegionSpec(tuple(parse_grid(cfg.region_grid)), size=cfg.region_size, mode=cfg.region_mode)
        if cfg.regions
        else None
    )
    progress = Progress("embed", len(todo), unit="shards", item="images")
    stats = dict(done)

    def make_actor():
        return make_embed_actor(
            embedder=cfg.embedder,
            weights=cfg.weights,
            options=cfg.embedder_options,
            num_cpus=cfg.embed_actor_cpus,
            num_gpus=num_gpus,
            concurrency=cfg.embed_concurrency,
            torch_threads=cfg.torch_threads,
            decode_cpus=cfg.decode_cpus,
            storage_options=so,
        )

    def on_result(item: tuple[int, str], result: dict[str, Any]) -> None:
        stats[item[0]] = result
        progress.update(1, int(result["count"]))
        if result["rejected"]:
            logger.info(
                "embed: shard %05d rejected %d sample(s): %s",
                item[0],
                result["rejected"],
                result["rejected_by_reason"],
            )

    outcome = run_pool(
        make_actor,
        num_actors,
        todo,
        lambda actor, item: actor.embed_shard.remote(
            item[0], item[1], cfg.out, cfg.batch_size, limits, pair_spec(cfg, len(shards), item[0]), regions
        ),
        per_actor=cfg.embed_concurrency,
        retries=cfg.retries,
        on_result=on_result,
        describe=lambda item: f"shard {item[0]:05d} ({item[1]})",
    )
    if outcome.failed:
        listing = "\n".join(f"  shard {i:05d} {url}: {err}" for (i, url), err in outcome.failed)
        raise CopyscanError(
            f"{len(outcome.failed)} shard(s) failed after {cfg.retries + 1} attempts; the other shards are done "
            f"and a rerun resumes from here:\n{listing}"
        )
    return stats


_import = ray.remote(clip_import.import_part)


def _import_all(
    cfg: IndexConfig, parts: list[tuple[str, str]], fingerprint: str, dim: int
) -> dict[int, dict[str, Any]]:
    """Precomputed clip-retrieval parts → embedding shards, in parallel CPU tasks; finished ones are skipped."""
    so = cfg.storage_options
    done = finished_shards(cfg.out, so)
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
    todo = [(i, part) for i, part in enumerate(parts) if i not in done]
    logger.info("import: %d of %d parts already done, %d to go", len(done), len(parts), len(todo))
    stats = dict(done)
    progress = Progress("import", len(todo), unit="parts", item="vectors")

    def on_result(item, result):
        stats[item[0]] = result
        progress.update(1, int(result["count"]))

    outcome = run_tasks(
        lambda item: _import.options(num_cpus=cfg.fill_cpus).remote(
            cfg.out, item[0], item[1][0], item[1][1], fingerprint, dim, so
        ),
        todo,
        max_in_flight=max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.fill_cpus)),
        retries=cfg.retries,
        on_result=on_result,
        describe=lambda item: f"part {item[0]:05d} ({item[1][0]})",
    )
    if outcome.failed:
        listing = "\n".join(f"  part {i:05d} {emb}: {err}" for (i, (emb, _)), err in outcome.failed)
        raise CopyscanError(f"{len(outcome.failed)} part(s) failed; the others are done:\n{listing}")
    return stats


def _train_once(
    cfg: IndexConfig, plan: IndexPlan, counts: dict[int, int], out: str, whitening_from: str | None = None
) -> dict[str, Any]:
    """Train the index at ``out`` (the output, or its region index) unless an earlier run did."""
    url = layout.trained_index_url(out, plan.factory)
    if storage.exists(url, cfg.storage_options):
        logger.info("train: %s exists, reusing it", url)
        return storage.read_json(layout.train_info_url(out, plan.factory), cfg.storage_options)
    return ray.get(
        _train.options(num_cpus=cfg.fill_cpus).remote(
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
        )
    )


def _fill_all(
    cfg: IndexConfig, plan: IndexPlan, out: str, density_per_image: int = 0
) -> dict[int, dict[str, Any]]:
    """Fill every index shard not yet filled (``density_per_image``: a region index's, with densities)."""
    so = cfg.storage_options
    markers: dict[int, dict[str, Any]] = {}
    todo = []
    for j, group in enumerate(plan.shard_groups):
        marker = index_shard_marker(out, plan.factory, j, so)
        if (
            marker is not None
            and marker.get("embedding_shards") == group
            and bool(marker.get("density")) == bool(density_per_image)
        ):
            markers[j] = marker
        else:
            todo.append((j, group))
    logger.info("fill: %d of %d index shards already done", len(markers), len(plan.shard_groups))
    progress = Progress("fill", len(todo), unit="index shards", item="vectors")

    def on_result(item, marker):
        markers[item[0]] = marker
        progress.update(1, int(marker["ntotal"]))

    outcome = run_tasks(
        lambda item: _fill.options(num_cpus=cfg.fill_cpus).remote(
            out, plan.factory, item[0], item[1], cfg.whitening != "none", so, density_per_image
        ),
        todo,
        max_in_flight=max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.fill_cpus)),
        retries=cfg.retries,
        on_result=on_result,
        describe=lambda item: f"index shard {item[0]:05d}",
    )
    if outcome.failed:
        listing = "\n".join(f"  index shard {j:05d}: {err}" for (j, _), err in outcome.failed)
        raise CopyscanError(f"{len(outcome.failed)} index shard(s) failed; rerun to resume:\n{listing}")
    return markers


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
    boxes = parse_grid(cfg.region_grid)
    per_image = len(boxes)
    missing = [s for s in sorted(stats) if (stats[s].get("regions") or {}).get("per_image") != per_image]
    if missing:
        raise CopyscanError(
            f"embedding shard(s) {missing[:5]} of {cfg.out} hold no region vectors of {per_image} boxes; "
            "use mode=overwrite to embed them again"
        )
    region_stats = {
        s: {
            "count": int(st["regions"]["count"]),
            "samples": int(st["regions"]["count"]),
            "rejected": 0,
            "rejected_by_reason": {},
            "id_range": st["regions"]["id_range"],
        }
        for s, st in stats.items()
    }
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
    described = {
        "per_image": per_image,
        "boxes": [list(b) for b in boxes],
        "grid": cfg.region_grid,
        "mode": cfg.region_mode,
        "size": cfg.region_size if cfg.region_mode == "crop" else None,
        "query_grid": cfg.region_query_grid,
        "query_size": cfg.region_query_size,
        "id_scheme": "shard << 32 | (row * per_image + box)",
    }
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
