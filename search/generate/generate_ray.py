"""The generation job on Ray: one actor per GPU (a CPU actor without GPUs), each loading the pipeline
once and generating whole shards; the driver plans the prompts, skips finished shards, retries failed
ones and gathers the per-prompt scores.

The plan (prompts and their shards, ``GEN/plan.parquet``) is made once and read back on resume, so a
rerun never redraws captions; each shard writes its tar and then its marker (``shards.py``).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.config import to_dict
from copyscan.indexing.runtime.pool_ray import run_pool
from copyscan.indexing.runtime.resumable import Stage, run_stage
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.lease import Lease
from copyscan.indexing.store.outputs import claim_output, output_lease
from copyscan.search.generate.config import GenerateConfig
from copyscan.search.generate.prompts import make_plan, shard_prompts
from copyscan.search.generate.sampling import Sampler, SampleSettings, checkpoint_id, local_checkpoint
from copyscan.search.generate.scores import prompt_scores, score_distribution
from copyscan.search.generate.shards import finished_shards, generate_shard

logger = logging.getLogger("copyscan")

STAGE = Stage("generate", "shard", "generations", count_field="generations")


class GenerateWorker:
    """Actor body: the checkpoint loaded once (copied to the node's cache first when remote)."""

    def __init__(self, cfg: GenerateConfig, ident: str, run: dict[str, Any], use_gpu: bool) -> None:
        import torch

        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        cache = cfg.cache_dir or os.environ.get("COPYSCAN_CACHE", os.path.expanduser("~/.cache/copyscan"))
        folder = local_checkpoint(cfg.checkpoint, ident, cache, cfg.storage_options)
        self.sampler = Sampler(folder, device, cfg.dtype, cfg.scheduler)
        self.out = cfg.out
        self.run = run
        self.storage_options = cfg.storage_options

    def generate(self, shard: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return generate_shard(self.sampler, self.out, shard, rows, self.run, self.storage_options)


def plan(cfg: GenerateConfig) -> tuple[pa.Table, dict[str, Any]]:
    """The run's plan, made once (``GEN/plan.parquet``) and read back on resume; with its counts."""
    so = cfg.storage_options
    url = storage.join(cfg.out, layout.GENERATE_PLAN_NAME)
    if storage.exists(url, so):
        table = pq.read_table(io.BytesIO(storage.read_bytes(url, so)))
    else:
        table, counts = make_plan(cfg)
        table = table.replace_schema_metadata({"copyscan_prompts": json.dumps(counts, sort_keys=True)})
        storage.write_parquet(url, table, so)
    raw = (table.schema.metadata or {}).get(b"copyscan_prompts")
    return table, json.loads(raw) if raw else {}


def _actors(cfg: GenerateConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): ``actors`` or one per GPU alive; CPU actors when the cluster has none."""
    cpus, gpus = cluster_ray.alive()
    per_actor_gpus = cfg.actor_gpus if gpus > 0 else 0.0
    if cfg.actors:
        return cfg.actors, per_actor_gpus
    if per_actor_gpus > 0:
        return max(1, int(gpus / per_actor_gpus)), per_actor_gpus
    return 1, 0.0


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary written to ``GEN/summary.json``. The run holds the
    lease on ``GEN`` throughout (a second writer is refused: ``indexing/store/lease.py``)."""
    with output_lease(cfg.out, "generate", layout.GENERATE_CONFIG_NAME, cfg.storage_options) as lease:
        return _run_generate(cfg, lease)


def _run_generate(cfg: GenerateConfig, lease: Lease) -> dict[str, Any]:
    so = cfg.storage_options
    t0 = time.time()
    ident = checkpoint_id(cfg.checkpoint, so)
    # the id too: new weights at the same URL must not be mixed into an earlier run's shards
    record = {**to_dict(cfg), "checkpoint_id": ident}
    keys = (*GenerateConfig.RESUME_KEYS, "checkpoint_id")
    resumed = claim_output(cfg.out, layout.GENERATE_CONFIG_NAME, record, cfg.mode, keys, so)
    table, counts = plan(cfg)
    by_shard = shard_prompts(table)
    run = {
        "seed": cfg.seed,
        "per_prompt": cfg.per_prompt,
        "batch_size": cfg.batch_size,
        "jpeg_quality": cfg.jpeg_quality,
        "checkpoint": cfg.checkpoint,
        "checkpoint_id": ident,
        "settings": SampleSettings.of(cfg),
    }
    actors, gpus = _actors(cfg)
    logger.info(
        "generate: %d prompts x %d in %d shard(s)%s from %s on %d actor(s) (%s)",
        table.num_rows,
        cfg.per_prompt,
        len(by_shard),
        " (resumed)" if resumed else "",
        ident,
        actors,
        f"{gpus:g} GPU each" if gpus else "CPU",
    )
    worker = ray.remote(GenerateWorker).options(num_cpus=cfg.actor_cpus, num_gpus=gpus)
    runner = functools.partial(
        run_pool,
        lambda: worker.remote(cfg, ident, run, gpus > 0),
        actors,
        submit=lambda actor, item: actor.generate.remote(item[0], item[1]),
        per_actor=1,
    )
    done = finished_shards(cfg.out, so)
    markers = run_stage(STAGE, sorted(by_shard.items()), done, runner, retries=cfg.retries)
    scores = prompt_scores(markers)
    storage.write_parquet(storage.join(cfg.out, layout.GENERATE_SCORES_NAME), scores, so)
    summary = _summary(cfg, ident, markers, scores, counts, len(done), time.time() - t0)
    lease.check()
    storage.write_json(layout.summary_url(cfg.out), summary, so)
    return summary


def _summary(
    cfg: GenerateConfig,
    ident: str,
    markers: dict[int, dict[str, Any]],
    scores: pa.Table,
    counts: dict[str, Any],
    resumed_shards: int,
    seconds: float,
) -> dict[str, Any]:
    top = scores.slice(0, 20).select(["rank", "prompt", "score", "score_max", "origin", "train_count"])
    return {
        "checkpoint": cfg.checkpoint,
        "checkpoint_id": ident,
        "shards": layout.generate_shards_dir(cfg.out),
        "prompts": scores.num_rows,
        "generations": sum(m["generations"] for m in markers.values()),
        "shards_total": len(markers),
        "shards_resumed": resumed_shards,
        "prompt_reading": counts,
        "score": {"score_steps": cfg.score_steps, **score_distribution(scores["score"].to_pylist())},
        "top_prompts": top.to_pylist(),
        # the shards' sampling time, summed over the runs that made them
        "sample_seconds": round(sum(m["sample_seconds"] for m in markers.values()), 3),
        "seconds": round(seconds, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
