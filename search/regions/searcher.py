"""The region index at scan time: its manifest, the query windows it is searched with, and its searcher."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.regions import RegionSpec, parse_grid, query_mode
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import load_manifest
from copyscan.search.ann.searcher import ShardSearcher, describe_row, index_cache_dir, load_metadata


def region_manifest(
    index_url: str, manifest: dict[str, Any], storage_options: storage.StorageOptions | None = None
) -> dict[str, Any] | None:
    """The region index's manifest (``OUT/regions/manifest.json``), or None when the index has none; it must
    belong to this build of the index."""
    described = manifest.get("regions")
    if not described:
        return None
    sub = load_manifest(layout.regions_root(index_url), storage_options)
    if sub.get("build_id") != described.get("build_id"):
        raise CopyscanError(
            f"the region index of {index_url} (build {sub.get('build_id')}) is not the one its manifest names "
            f"({described.get('build_id')}); rerun `copyscan index` to finish it"
        )
    return sub


def query_regions(
    manifest: dict[str, Any],
    grid: str | None = None,
    size: int = 0,
    mode: str = "crop",
    split_product: bool = False,
) -> RegionSpec:
    """The query windows of a scan: the index's (``regions.query_grid``) unless overridden, embedded and
    sized as ``query_mode`` resolves ``ScanConfig.region_query_mode`` and ``region_query_size``."""
    boxes = tuple(parse_grid(grid if grid else manifest["regions"]["query_grid"]))
    spec_mode, spec_size = query_mode(manifest, mode, size, split_product)
    return RegionSpec(boxes, size=spec_size, mode=spec_mode)


class RegionSearcher(ShardSearcher):
    """A ShardSearcher over region index shards that describes hits by their training image.

    Region ids are ``shard << 32 | (row · per_image + box)``; ``describe`` adds the image's id and metadata
    (read from the index's own metadata files) and the box."""

    def __init__(
        self,
        index_url: str,
        sub_manifest: dict[str, Any],
        index_shards: Sequence[int],
        cache_dir: str = "",
        storage_options: storage.StorageOptions | None = None,
        density_beta: float = 0.0,
        device: str = "cpu",
    ) -> None:
        root = layout.regions_root(index_url)
        super().__init__(root, sub_manifest, index_shards, cache_dir, storage_options, density_beta, device)
        self.per_image = int(sub_manifest["regions_of"]["per_image"])
        cache = index_cache_dir(cache_dir, index_url, sub_manifest)
        for s in self.vectors:
            self.metadata[s] = load_metadata(
                layout.metadata_url(index_url, s),
                os.path.join(cache, "metadata", f"metadata_{s:05d}.parquet"),
                storage_options,
            )

    def describe(self, I: np.ndarray) -> dict[int, dict[str, Any]]:
        """Region ids ``I`` (any shape, -1 = none) → {region id: its training image's metadata, ``image_id``
        (packed image id) and ``box`` (index into the index's region boxes)}."""
        meta: dict[int, dict[str, Any]] = {}
        unique = np.unique(I[I >= 0])
        shards, rows = layout.unpack_ids(unique)
        for i, s, r in zip(unique.tolist(), shards.tolist(), rows.tolist(), strict=True):
            image, box = divmod(r, self.per_image)
            meta[i] = {
                **describe_row(self.metadata[s], image),
                "index_shard": self.owner[s],
                "image_id": int(layout.pack_ids(s, np.array([image]))[0]),
                "box": box,
            }
        return meta
