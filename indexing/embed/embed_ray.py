"""Ray glue for embedding: CPU decode tasks stream batches to embedding actors (model loaded once each).

One call of ``EmbedWorker.embed_shard`` handles one shard end to end: it starts a decode task (a Ray
streaming generator scheduled on any CPU in the cluster), runs the model on each batch as it arrives,
writes the shard's outputs and finally its stats marker. Several calls run concurrently per actor
(``max_concurrency``) so decoding of one shard overlaps inference on another.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray

from indexing.embed.decode import DecodedBatch, DecodeLimits, PairSpec, decode_samples
from indexing.embed.stage import EmbeddedSource, embed_batches, write_shard_outputs
from indexing.models.embedder import make_preprocess
from indexing.models.embedders import load_embedder
from indexing.models.regions import RegionSpec
from indexing.read.reader import iter_image_files, iter_tar
from indexing.store import storage

# Batches a decode task may run ahead of the model: bounds object-store memory per shard in flight.
PREFETCH_BATCHES = 4


def _decode_source(
    source: tuple[str, Any],
    preprocess_spec: dict[str, Any],
    batch_size: int,
    limits: DecodeLimits,
    storage_options: storage.StorageOptions | None,
    pairs: PairSpec | None = None,
    region_spec: dict[str, Any] | None = None,
) -> Iterator[DecodedBatch]:
    kind, payload = source
    if kind == "tar":
        samples = iter_tar(payload, storage_options)
    elif kind == "images":
        urls, keys = payload
        samples = iter_image_files(urls, keys, storage_options)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    yield from decode_samples(
        samples,
        make_preprocess(preprocess_spec),
        batch_size,
        limits,
        preprocess_spec["size"],
        pairs,
        make_preprocess(region_spec) if region_spec else None,
    )


decode_task = ray.remote(_decode_source)


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

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.embedder = load_embedder(embedder, weights, device, options)
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
    ) -> EmbeddedSource:
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
        )
        return embed_batches((ray.get(ref) for ref in gen), self.embedder, regions, aligned, keep_pixels)

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
        stats. The arguments of ``indexing.embed.stage.embed_shard``, less the embedder (this actor's)."""
        t0 = time.perf_counter()
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
                "worker": f"{os.uname().nodename}:{os.getpid()}",
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
    ) -> EmbeddedSource:
        return self._embed(
            ("images", (list(urls), list(keys))),
            batch_size,
            limits,
            regions=regions,
            aligned=aligned,
            keep_pixels=keep_pixels,
        )

    def embed_tar(
        self,
        url: str,
        batch_size: int,
        limits: DecodeLimits,
        regions: RegionSpec | None = None,
        aligned: RegionSpec | None = None,
        keep_pixels: bool = False,
    ) -> EmbeddedSource:
        return self._embed(
            ("tar", url), batch_size, limits, regions=regions, aligned=aligned, keep_pixels=keep_pixels
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
    return actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=concurrency).remote(
        embedder,
        weights,
        options,
        "cuda" if num_gpus > 0 else "cpu",
        torch_threads,
        decode_cpus,
        storage_options,
    )


@ray.remote
def embedder_spec_remote(name: str, weights: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """The spec of an embedder, computed on a worker (the driver may not have the weights or a GPU)."""
    return load_embedder(name, weights, "cpu", options).spec


def embed_pool_size(embed_actors: int, embed_actor_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor) for an embedding pool on the connected cluster.

    ``embed_actor_gpus`` < 0 means one GPU each when the cluster has GPUs, else CPU actors.
    ``embed_actors`` 0 means one per GPU, or on a CPU-only cluster one per 4 CPUs (each actor's model
    runs on one thread; the other CPUs decode).
    """
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    num_gpus = embed_actor_gpus if embed_actor_gpus >= 0 else (1.0 if gpus >= 1 else 0.0)
    if embed_actors:
        return embed_actors, num_gpus
    if num_gpus > 0:
        return max(1, int(gpus / num_gpus)), num_gpus
    return max(1, int(cpus // 4)), 0.0
