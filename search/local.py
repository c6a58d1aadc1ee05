"""An index opened in this process, searched with images or vectors: a notebook, a plain loop, or Ray Data.

``Index(url)`` holds every index shard of ``url`` (memory-mapped, cached locally like a scan actor's), the
score normalisation and the ``is_copy`` threshold of a scan with the same settings (``k``, ``candidates``,
``nprobe``, ``beta``, ``threshold``, ``weights``, ... are ScanConfig's keys), and loads the index's embedder
the first time it is given images. ``search`` answers with the scan's matches columns, one row per (query,
rank). ``Index`` is also a Ray Data batch function (``__call__``): ``ds.map_batches(Index,
fn_constructor_args=(url,), concurrency=N)`` over ``ray.data.read_images(..., include_paths=True)``.

For millions of generations use ``copyscan scan`` (resumable, fanned out over scan actors); this is for
the analytics around it: a few thousand images from a notebook, a Ray Data or Spark pipeline of one's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits, Rejected, decode_image
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import storage
from copyscan.indexing.store.manifest import index_embedder, load_manifest
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.calibrate.thresholds import resolve_threshold
from copyscan.search.results.matches import MATCHES_SCHEMA, matches_table
from copyscan.search.scan_config import ScanConfig

# the matches columns ``search`` returns (the scan's global columns; the region and verification ones are
# the scan's own)
COLUMNS = (
    "query_id",
    "rank",
    "train_key",
    "score",
    "score_norm",
    "score_raw",
    "is_copy",
    "train_url",
    "caption",
    "index_shard",
    "train_id",
    "sha256",
    "license",
    "pwatermark",
    "punsafe",
    "clip_similarity",
)
Images = Sequence[Any]  # PIL images, (H, W, 3) uint8 arrays, encoded bytes or file paths / URLs


class Index:
    """A copyscan index searched in this process (module docstring). ``keys``: ScanConfig keys (``k=10``,
    ``threshold="p90"``, ``weights=...``, ``storage_options={...}``, ...), checked as the CLI checks them."""

    def __init__(
        self, url: str, *, image_column: str = "image", id_column: str = "path", **keys: Any
    ) -> None:
        self.cfg = resolve(ScanConfig, {"index": url, "queries": "", "out": "", **keys})
        so = self.cfg.storage_options
        self.url = url
        self.manifest = load_manifest(url, so)
        self.settings = self.cfg.search_settings(self.manifest)
        shards = [e["index_shard"] for e in self.manifest["index_shards"]]
        self.searcher = ShardSearcher(
            url, self.manifest, shards, self.cfg.cache_dir, so, device=self.cfg.search_device
        )
        self.normalise = ScoreNormaliser(url, self.manifest, self.cfg.beta, so)
        self.threshold = resolve_threshold(self.manifest, self.cfg.threshold)
        self.image_column, self.id_column = image_column, id_column
        self._embedder = None

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def embedder(self):
        """The index's embedder (its weights, unless ``weights=``), loaded on first use and checked against
        the manifest."""
        if self._embedder is None:
            spec = self.manifest["embedder"]
            weights = (
                self.cfg.weights if self.cfg.weights is not None else self.manifest["config"].get("weights")
            )
            if spec["name"] == "laion-clip" and not weights:
                raise CopyscanError(
                    f"{self.url} holds imported CLIP vectors: give weights= (the image tower) to search it "
                    "with images, or search it with vectors"
                )
            self._embedder = index_embedder(self.manifest, weights)
        return self._embedder

    def embed(self, images: Images) -> np.ndarray:
        """(n, d) float32 unit descriptors of ``images`` (PIL images, (H, W, 3) uint8 arrays, encoded bytes,
        or paths / URLs of image files), in batches of ``batch_size``."""
        embedder = self.embedder
        out = []
        for start in range(0, len(images), self.cfg.batch_size):
            pixels = [
                embedder.preprocess(_as_image(x, self.cfg))
                for x in images[start : start + self.cfg.batch_size]
            ]
            out.append(embedder.embed(np.stack(pixels)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def search(self, queries: np.ndarray | Images, k: int = 0, ids: Sequence[str] | None = None) -> pa.Table:
        """The best ``k`` (default: the ``k`` key) training images of each query: a table of the scan's
        matches columns (``COLUMNS``), one row per (query, rank), ``query_id`` = ``ids[i]`` (default: the
        query's position). ``queries``: (n, d) descriptors (float; this index's embedder and space, raw:
        not whitened) or images (``embed``)."""
        xq = _vectors(queries, self.dim) if _are_vectors(queries) else self.embed(queries)
        ids = [str(i) for i in range(len(xq))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(xq):
            raise CopyscanError(f"{len(ids)} ids for {len(xq)} queries")
        if not len(xq):
            return pa.table({c: pa.array([], MATCHES_SCHEMA.field(c).type) for c in COLUMNS})
        k = k or self.cfg.k
        result = self.searcher.search(xq, k, max(self.settings["candidates"], k), self.settings["nprobe"])
        result = replace(result, D_norm=self.normalise(xq, result.D, result.I))
        table = matches_table([{"key": i} for i in ids], result, chunk=-1, threshold=self.threshold)
        return table.select(list(COLUMNS))

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        """A Ray Data batch (``map_batches``) → its matches: the queries are ``batch[image_column]`` (images,
        as ``ray.data.read_images`` gives them) or, without it, ``batch["vector"]`` ((n, d) descriptors);
        ``query_id`` from ``batch[id_column]`` when present (``include_paths=True`` gives ``path``)."""
        if self.image_column in batch:
            queries = list(batch[self.image_column])
        elif "vector" in batch:
            queries = np.asarray(list(batch["vector"]), dtype=np.float32)
        else:
            raise CopyscanError(
                f"a batch needs an {self.image_column!r} or a 'vector' column, got {sorted(batch)}"
            )
        ids = list(batch[self.id_column]) if self.id_column in batch else None
        return self.search(queries, ids=ids)


def _are_vectors(queries: Any) -> bool:
    """A float (n, d) array (or a list of float vectors), as opposed to images."""
    if isinstance(queries, np.ndarray):
        return queries.ndim == 2 and np.issubdtype(queries.dtype, np.floating)
    return (
        bool(len(queries))
        and isinstance(queries[0], np.ndarray)
        and queries[0].ndim == 1
        and np.issubdtype(queries[0].dtype, np.floating)
    )


def _vectors(queries: Any, dim: int) -> np.ndarray:
    xq = np.ascontiguousarray(np.asarray(queries), dtype=np.float32)
    if xq.ndim != 2 or xq.shape[1] != dim:
        raise CopyscanError(f"vectors of shape {xq.shape}: this index holds (n, {dim}) descriptors")
    norms = np.linalg.norm(xq, axis=1, keepdims=True)
    if not np.isfinite(xq).all() or (norms < 1e-6).any():
        raise CopyscanError("vectors must be finite and non-zero")
    return xq / norms


def _as_image(x: Any, cfg: ScanConfig) -> Image.Image:
    """A decoded PIL image, as the scan's decode gives it to the embedder's preprocessing (which handles
    modes and transparency): from a PIL image, an (H, W[, C]) uint8 array, encoded bytes or a path / URL;
    the scan's limits (``max_image_pixels``, ``min_image_side``) apply, a bad image is a CopyscanError."""
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3):
            raise CopyscanError(f"an image array must be (H, W[, C]) uint8, got {x.dtype} {x.shape}")
        return Image.fromarray(x)
    if isinstance(x, (bytes, bytearray)):
        data, name = bytes(x), "image bytes"
    elif isinstance(x, (str, os.PathLike)):
        data, name = storage.read_bytes(str(x), cfg.storage_options), str(x)
    else:
        raise CopyscanError(f"cannot read an image from a {type(x).__name__}")
    try:
        return decode_image(
            data, DecodeLimits(cfg.max_image_pixels, cfg.min_image_side, cfg.max_decode_seconds)
        )
    except Rejected as exc:
        raise CopyscanError(f"{name}: {exc}") from None
