"""Ray glue for embedding: CPU decode tasks stream batches to embedding actors (model loaded once each).

One call of ``EmbedWorker.embed_shard`` handles one shard end to end: it starts a decode task (a Ray
streaming generator scheduled on any CPU in the cluster, ``decode_ray.py``), runs the model on each batch as
it arrives, writes the shard's outputs and finally its stats marker. Several calls run concurrently per actor
(``max_concurrency``) so decoding of one shard overlaps inference on another.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from copyscan.indexing.embed.decode import DecodeLimits, PairSpec
from copyscan.indexing.embed.decode_ray import decode_task
from copyscan.indexing.embed.fanout import EmbedCalls, ModelClock
from copyscan.indexing.embed.stage import EmbeddedSource, embed_batches, write_shard_outputs
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.regions import RegionSpec
from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.cluster_ray import PoolSize
from copyscan.indexing.runtime.malloc import ONE_ARENA_ENV, keep_freed_memory
from copyscan.indexing.runtime.progress import WithinProgress
from copyscan.indexing.store import storage

# Batches a decode task may run ahead of the model: bounds object-store memory per shard in flight.
PREFETCH_BATCHES = 4
# A CPU embedding actor per this many CPUs; its model runs on as many threads (``cpu_model_threads``), one
# batch at a time, while decode tasks take what the model leaves (decoding costs a tenth of the model or less).
CPUS_PER_CPU_ACTOR = 4.0


def _print_progress(line: str) -> None:
    print(f"copyscan: {line}", file=sys.stderr, flush=True)


def _worker() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def cpu_model_threads() -> int:
    """torch threads of a CPU embedding actor's model (``torch_threads=0``): ``CPUS_PER_CPU_ACTOR``, or the
    CPUs this process may run on where there are fewer."""
    return max(1, min(int(CPUS_PER_CPU_ACTOR), len(os.sched_getaffinity(0))))


class OneBatchAtATime(EmbedCalls):
    """An embedder whose ``embed*`` calls run one at a time (a lock), the rest of it as it is.

    A CPU actor's calls in flight (``embed_concurrency``) then overlap their decoding, reading and writing
    but not their forward passes, and each forward pass has all the actor's threads: a lone call (a scan's
    only chunk, the last shard of an index) runs at the model's full speed, where calls that each ran the
    model on a thread of their own left the other threads idle. (A shard's ``embed`` seconds then include
    its waits for the other calls' batches.)
    """

    def around(self) -> threading.Lock:
        return self._lock


class EmbedWorker:
    """Actor body. Create with ``make_embed_actor``."""

    def __init__(
        self,
        embedder: str,
        weights: str | None,
        options: dict[str, Any] | None,
        device: str,
        torch_threads: int,
        decode_cpus: float,
        storage_options: storage.StorageOptions | None,
    ) -> None:
        import torch

        keep_freed_memory()  # a batch's activations reused from the heap, not mapped afresh each time
        if device == "cuda" and not torch.cuda.is_available():
            # Ray gave this actor a GPU resource, but the node has no CUDA device torch can use (a node type
            # that declares GPUs it does not have, or a CPU build of torch): embed on the CPU instead.
            # Printed, not logged: one line per actor in the driver's log, the same from every such actor,
            # which Ray's log deduplication shows once.
            print(
                "copyscan: an embedding actor holds a GPU but torch sees no CUDA device: embedding on CPU",
                file=sys.stderr,
            )
            device = "cpu"
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        elif device == "cpu":
            torch.set_num_threads(cpu_model_threads())
        self.embedder = load_embedder(embedder, weights, device, options)
        if device == "cpu" and torch_threads == 0:
            self.embedder = OneBatchAtATime(self.embedder)
        self.embedder = self.clock = ModelClock(self.embedder)  # its cost an image, for DecodeFanout
        self.device = device
        self.decode_cpus = decode_cpus
        self.storage_options = storage_options

    def spec(self) -> dict[str, Any]:
        return self.embedder.spec

    def _embed(
        self,
        source: tuple[str, Any],
        batch_size: int,
        limits: DecodeLimits,
        pairs: PairSpec | None = None,
        regions: RegionSpec | None = None,
        aligned: RegionSpec | None = None,
        keep_pixels: bool = False,
        label: str | None = None,
        total: int | None = None,
        draft: bool = False,
    ) -> EmbeddedSource:
        """``source`` decoded by a decode task and embedded here; with ``label``, progress lines on stderr
        (which Ray shows in the driver's log) while a long one runs (``WithinProgress``)."""
        preprocess = self.embedder.spec["preprocess"]
        gen = decode_task.options(
            num_cpus=self.decode_cpus, _generator_backpressure_num_objects=PREFETCH_BATCHES
        ).remote(
            source,
            preprocess,
            batch_size,
            limits,
            self.storage_options,
            pairs,
            regions.preprocess_spec(preprocess) if regions is not None else None,
            draft,
        )
        progress = None if label is None else WithinProgress(label, total, _print_progress)
        result = embed_batches(
            (ray.get(ref) for ref in gen), self.embedder, regions, aligned, keep_pixels, progress
        )
        self.clock.count(len(result.records))
        result.actor_model = self.model_totals()
        return result

    def model_totals(self) -> dict[str, Any]:
        """``ModelClock.totals`` and this actor's worker name: the model's cost an image so far
        (``copyscan.indexing.embed.fanout.DecodeFanout``)."""
        return {"worker": _worker(), **self.clock.totals()}

    def embed_shard(
        self,
        out: str,
        shard: int,
        url: str,
        batch_size: int,
        limits: DecodeLimits,
        pairs: PairSpec | None = None,
        regions: RegionSpec | None = None,
    ) -> dict[str, Any]:
        """Embed tar shard ``url`` (and, with ``pairs``, augmented copies of its first images; with
        ``regions``, its region vectors) and write its outputs as shard ``shard`` of ``out``; return its
        stats. The arguments of ``copyscan.indexing.embed.stage.embed_shard``, less the embedder (this
        actor's)."""
        t0, started = time.perf_counter(), time.time()
        result = self._embed(("tar", url), batch_size, limits, pairs, regions)
        return write_shard_outputs(
            out,
            shard,
            url,
            result,
            self.embedder.fingerprint,
            self.storage_options,
            {
                "wall_seconds": round(time.perf_counter() - t0, 3),
                "started": round(started, 3),  # Unix time: with wall_seconds, the shard's place in a timeline
                "worker": _worker(),
                "actor_model": result.actor_model,
            },
        )

    def embed_images(
        self,
        urls: Sequence[str],
        keys: Sequence[str],
        batch_size: int,
        limits: DecodeLimits,
        regions: RegionSpec | None = None,
        aligned: RegionSpec | None = None,
        keep_pixels: bool = False,
        label: str | None = None,
        draft: bool = False,
    ) -> EmbeddedSource:
        return self._embed(
            ("images", (list(urls), list(keys))),
            batch_size,
            limits,
            regions=regions,
            aligned=aligned,
            keep_pixels=keep_pixels,
            label=label,
            total=len(urls),
            draft=draft,
        )

    def embed_tar(
        self,
        url: str,
        batch_size: int,
        limits: DecodeLimits,
        regions: RegionSpec | None = None,
        aligned: RegionSpec | None = None,
        keep_pixels: bool = False,
        label: str | None = None,
        draft: bool = False,
    ) -> EmbeddedSource:
        return self._embed(
            ("tar", url),
            batch_size,
            limits,
            regions=regions,
            aligned=aligned,
            keep_pixels=keep_pixels,
            label=label,
            draft=draft,
        )

    def embed_crops_each(self, pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """``Embedder.embed_crops_each``: boxes (n, B, 4) of their own cut from every image → (n, B, d)."""
        return self.embedder.embed_crops_each(pixels, boxes)


def make_embed_actor(
    *,
    embedder: str,
    weights: str | None,
    options: dict[str, Any] | None,
    num_cpus: float,
    num_gpus: float,
    concurrency: int,
    torch_threads: int,
    decode_cpus: float,
    storage_options: storage.StorageOptions | None,
):
    """Start one embedding actor; ``num_gpus > 0`` puts it on a GPU and runs the model there."""
    actor_cls = ray.remote(EmbedWorker)
    return actor_cls.options(**embed_actor_options(num_cpus, num_gpus, concurrency)).remote(
        embedder,
        weights,
        options,
        "cuda" if num_gpus > 0 else "cpu",
        torch_threads,
        decode_cpus,
        storage_options,
    )


def embed_actor_options(num_cpus: float, num_gpus: float, concurrency: int) -> dict[str, Any]:
    """Ray options of an embedding actor. Its calls in flight (``concurrency``) run on threads of Ray's call
    pool, and so does its model: its process must start with one malloc arena (``malloc.ONE_ARENA_ENV``), or
    each batch's activations are mapped and faulted in afresh. The jobs' own Ray (``init_ray``) gives every
    worker that env; on a Ray started elsewhere the actor gets it as a runtime_env of its own (added to the
    job's env_vars), which costs a worker process started for it (0.6–1 s measured) instead of an idle one."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_concurrency": concurrency}
    job_env = ray.get_runtime_context().runtime_env.get("env_vars") or {}
    if any(job_env.get(k) != v for k, v in ONE_ARENA_ENV.items()):
        options["runtime_env"] = {"env_vars": dict(ONE_ARENA_ENV)}
    return options


@ray.remote
def embedder_spec_remote(name: str, weights: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """The spec of an embedder, computed on a worker (the driver may not have the weights or a GPU)."""
    return load_embedder(name, weights, "cpu", options).spec


def embedder_spec(
    name: str, weights: str | None, options: dict[str, Any] | None, num_cpus: float
) -> dict[str, Any]:
    """The spec of an embedder: without a weights file (the packaged model) computed in this process, which
    has all it needs (a fraction of a second, where a fresh worker first spends seconds importing torch);
    with one, on a worker of ``num_cpus`` CPUs, since the driver may not reach the weights' path."""
    if weights is None:
        return load_embedder(name, None, "cpu", options).spec
    return ray.get(embedder_spec_remote.options(num_cpus=num_cpus).remote(name, weights, options))


def embed_pool(
    items: int, embed_actors: int, embed_actor_gpus: float, embed_actor_cpus: float, max_gpus: float = 0.0
) -> PoolSize:
    """The embedding pool for ``items`` work items (shards, query chunks) on the connected cluster.

    ``embed_actor_gpus`` < 0 (auto): actors of one GPU when the cluster has GPUs or its autoscaler can start a
    node with one (``cluster_ray.gpus_possible``), else CPU actors. ``embed_actors`` > 0: that many actors;
    0: one per alive GPU (GPU actors) or per 4 alive CPUs (CPU actors: the other CPUs decode), growing as
    nodes join; either way at most one per item and, for GPU actors, ``max_gpus`` GPUs in all (0: no limit).
    """
    num_gpus = embed_actor_gpus if embed_actor_gpus >= 0 else (1.0 if cluster_ray.gpus_possible() else 0.0)
    cap = max(1, items)
    if num_gpus > 0 and max_gpus > 0:
        cap = min(cap, max(1, int(max_gpus // num_gpus)))
    if embed_actors:
        return PoolSize(min(cap, embed_actors), num_gpus, actor_cpus=embed_actor_cpus, fixed=True)
    return PoolSize(cap, num_gpus, CPUS_PER_CPU_ACTOR, embed_actor_cpus)
