"""Configuration of the index job (``copyscan index``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedders import DEFAULT_EMBEDDER
from copyscan.indexing.models.regions import MODES as REGION_MODES
from copyscan.indexing.models.regions import QUERY_GRID, QUERY_SIZE, TRAIN_GRID, check_train_boxes, parse_grid
from copyscan.indexing.runtime.config import key
from copyscan.indexing.runtime.devices import DEVICES

MODES = ("resume", "overwrite")
WHITENINGS = ("learned", "pca", "none")


@dataclass(frozen=True)
class IndexConfig:
    """Every knob of ``copyscan index``; set with a YAML file (``--config``) and/or ``key=value``."""

    shards: str = key(
        help="img2dataset webdataset tars: brace pattern, glob, folder or list file (any fsspec URL)"
    )
    out: str = key(help="output URL of the index (local path, s3://...)")
    mode: str = key(
        "resume", "resume: skip finished shards; overwrite: delete a previous copyscan output first"
    )

    # Embedding
    embedder: str = key(DEFAULT_EMBEDDER, "embedder: effnet-lite0, sscd, dino-vitb16 or laion-clip (README)")
    weights: str | None = key(
        None, "embedder weights: local path or fsspec URL; null = the embedder's packaged ones"
    )
    embedder_options: dict[str, Any] = key(
        help="embedder settings, e.g. {size: 288} or {model: ViT-L-14}", factory=dict
    )
    batch_size: int = key(64, "images per forward pass")
    max_image_pixels: int = key(64_000_000, "larger images are rejected (too_large) before decoding")
    min_image_side: int = key(8, "images with a smaller side are rejected (too_small)")
    max_decode_seconds: float = key(
        20.0, "an image taking longer to open and decode is rejected (decode_timeout)"
    )
    # 0 = one per alive GPU, or per 4 alive CPUs on a CPU-only cluster, growing as nodes join, at most one per
    # shard; N = N actors
    embed_actors: int = key(
        0, "embedding actors; 0 = one per alive GPU (or per 4 CPUs), growing as nodes join"
    )
    embed_actor_cpus: float = key(0.5, "CPUs per embedding actor")
    # -1 = 1 if the cluster has GPUs or its autoscaler can start a GPU node, else 0 (CPU actors)
    embed_actor_gpus: float = key(
        -1.0, "GPUs per embedding actor; -1 = 1 when the cluster has or can start GPUs, else 0"
    )
    max_gpus: float = key(0.0, "GPUs the embedding actors may hold in all; 0 = no limit")
    actor_start_timeout: float = key(
        900.0, "seconds a pool waits for its first actor to start (a node booting)"
    )
    # Each shard in flight has a decode task of its own: 0 = as many as the actor's model needs, from the
    # measured cost an image of a decode task and of the model (indexing/embed/fanout.py): 2 on a CPU actor,
    # tens on a GPU one, within the CPUs the cluster has for decoding (README "Throughput")
    embed_concurrency: int = key(
        0, "shards in flight (decode tasks) per embedding actor; 0 = from the measured decode and model rates"
    )
    decode_cpus: float = key(0.5, "CPUs per decode task")
    torch_threads: int = key(
        0,
        "torch threads per embedding actor; 0: a CPU actor's model, one batch at a time, on min(4, CPUs)",
    )
    retries: int = key(2, "extra attempts for a failed shard")

    # Index
    index_factory: str = key(
        "auto", 'faiss index: auto (the planner) or a factory string, e.g. "IVF4096,PQ64np"'
    )
    flat_threshold: int = key(100_000, "below this many vectors the index is exact (IDMap,Flat)")
    max_shard_vectors: int = key(10_000_000, "vectors per index shard at most")
    max_code_bytes: int = key(64, "PQ bytes per vector at most")
    shard_memory_bytes: int = key(0, "bound on an index shard's ANN part (codes, ids, centroids); 0 = none")
    recall_target: float = key(
        0.95, "recall@10 after re-ranking that the planned nprobe and re-rank depth aim at"
    )
    nprobe: int = key(0, "default nprobe recorded for scans; 0 = the planner's choice")
    fill_cpus: float = key(1.0, "CPUs per index-fill task")
    # The training task's GPUs (k-means of the coarse quantizer): -1 = 1 for an IVF index when the cluster has
    # GPUs or its autoscaler can start a GPU node, else 0
    train_gpus: float = key(
        -1.0, "GPUs of the training task (coarse k-means); -1 = 1 for IVF when GPUs are there or can start"
    )
    # What runs the coarse k-means: auto (faiss-gpu, else torch on a CUDA device, else the CPU), cpu, faiss-gpu,
    # torch (indexing/build/clustering.py)
    train_device: str = key("auto", "what runs the coarse k-means: auto, cpu, faiss-gpu or torch")
    # "learned": whitening learned from pairs (image, augmented copy) made while embedding, so the directions
    # along which copies move count less; "pca": shrunk PCA-whitening of the database vectors; "none".
    # See indexing/build/postprocess.py and the README's evaluation.
    whitening: str = key(
        "learned", "learned (from image/augmented-copy pairs), pca (of the database vectors) or none"
    )
    whitening_pair_images: int = key(
        10_000, "images (in all) that get augmented copies: the first ones of each shard"
    )
    whitening_pair_copies: int = key(2, "augmented copies per such image")
    whitening_shrinkage: float = key(
        0.1, "shrinkage towards the identity of the pair-difference (or database) covariance"
    )
    whitening_pca_shrinkage: float | None = key(
        0.3, "learned whitening only: a second, PCA stage's shrinkage; null = none"
    )
    whitening_sample: int = key(100_000, "vectors the whitening is fitted on")
    background_size: int = key(10_000, "database sample kept (whitened) for score normalisation")
    seed: int = key(0, "random seed (samples, whitening pairs, k-means)")

    # Partial copies (indexing/models/regions.py): every image also gets one vector per box of ``region_grid``
    # (pooled from the same forward pass) in a second, region index under OUT/regions/; scans search it with
    # windows of ``region_query_grid`` pooled from the query at ``region_query_size`` px (the manifest
    # records both, a scan may override the query side).
    regions: bool = key(
        False, "also build a region index (one vector per region_grid box) for partial copies"
    )
    region_grid: str = key(
        TRAIN_GRID,
        "boxes of every training image, S:N,... (squares of side S, N x N positions; indexing/models/regions.py)",
    )
    # "crop": every box cut from the image preprocessed at region_size px and embedded (one pass per box:
    # the same kind of vector as the scan's query windows); "pool": every box pooled from the forward pass
    # of the global vector (free, effnet-lite0 only, but such vectors match cropped windows poorly)
    region_mode: str = key(
        "crop", "crop: each box cut and embedded at region_size px; pool: pooled from the global pass"
    )
    region_size: int = key(
        QUERY_SIZE, "px an image is preprocessed at before its boxes are cut (region_mode=crop)"
    )
    region_query_grid: str = key(
        QUERY_GRID, "windows a scan cuts from each query (grid spec); recorded in the manifest"
    )
    region_query_size: int = key(QUERY_SIZE, "px a scan preprocesses the query at before cutting windows")
    region_factory: str = key("auto", "like index_factory, for the region index")

    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    # Keys whose change makes an existing output incompatible (resume would mix two different indexes).
    RESUME_KEYS = (
        "shards",
        "embedder",
        "weights",
        "embedder_options",
        "index_factory",
        "flat_threshold",
        "max_shard_vectors",
        "max_code_bytes",
        "whitening",
        "whitening_pair_images",
        "whitening_pair_copies",
        "whitening_shrinkage",
        "whitening_pca_shrinkage",
        "whitening_sample",
        "background_size",
        "seed",
        "regions",
        "region_grid",
        "region_mode",
        "region_size",
        "region_factory",
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (``copyscan.indexing.runtime.config.resolve`` reports them with bad
        types)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in (
            "batch_size",
            "max_image_pixels",
            "min_image_side",
            "max_decode_seconds",
            "max_shard_vectors",
            "max_code_bytes",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.train_device not in DEVICES:
            problems.append(f"train_device must be one of {', '.join(DEVICES)}, not {self.train_device!r}")
        for name in ("embed_actor_cpus", "decode_cpus", "fill_cpus"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.whitening not in WHITENINGS:
            problems.append(f"whitening must be one of {', '.join(WHITENINGS)}, not {self.whitening!r}")
        if self.whitening_pair_images < 0 or self.whitening_pair_copies < 1:
            problems.append("whitening_pair_images must be >= 0 and whitening_pair_copies >= 1")
        if not 0.0 <= self.whitening_shrinkage <= 1.0:
            problems.append("whitening_shrinkage must be in [0, 1]")
        if self.whitening_pca_shrinkage is not None and not 0.0 <= self.whitening_pca_shrinkage <= 1.0:
            problems.append("whitening_pca_shrinkage must be in [0, 1] or null")
        if self.whitening_sample < 2 or self.background_size < 4:
            problems.append("whitening_sample must be >= 2 and background_size >= 4")
        if self.shard_memory_bytes < 0:
            problems.append("shard_memory_bytes must be >= 0 (0 = no bound)")
        if not 0.0 < self.recall_target < 1.0:
            problems.append(f"recall_target must be in (0, 1), not {self.recall_target}")
        if self.retries < 0 or self.embed_actors < 0 or self.flat_threshold < 0 or self.nprobe < 0:
            problems.append("retries, embed_actors, flat_threshold and nprobe must be >= 0")
        if self.embed_concurrency < 0:
            problems.append("embed_concurrency must be >= 0 (0 = from the measured rates)")
        if self.regions:
            try:
                check_train_boxes(parse_grid(self.region_grid))
                parse_grid(self.region_query_grid)
            except CopyscanError as exc:
                problems.append(str(exc))
            if self.region_query_size < 64 or self.region_query_size % 32:
                problems.append("region_query_size must be a multiple of 32 and >= 64")
            if self.region_mode not in REGION_MODES:
                problems.append(
                    f"region_mode must be one of {', '.join(REGION_MODES)}, not {self.region_mode!r}"
                )
            if self.region_size < 64:
                problems.append("region_size must be >= 64")
        return problems
