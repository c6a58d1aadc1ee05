"""The training images a calibration copies: rows drawn from the index's embedding shards (never the whitening's
pair images when it can help it), read back from the index's source shards."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits, Rejected, decode_image, pair_quota
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.store import storage

MIN_IMAGES = 10


def select_rows(
    manifest: dict[str, Any],
    images: int,
    max_shards: int,
    seed: int,
    keys_of: Callable[[int], Sequence[str]] | None = None,
) -> tuple[dict[int, np.ndarray], bool]:
    """Rows to copy, by embedding shard, seeded, spread over at most ``max_shards`` shards, and whether they
    include images the learned whitening saw copies of (only when the collection has too few others: the
    first rows of every shard are its pair images, see ``copyscan.indexing.embed.decode.pair_quota``).

    ``keys_of(shard)`` (the shard's keys in row order) makes the draw one of keys, not of positions: the same
    images are chosen whatever order img2dataset wrote the shard's samples in."""
    shards = [e for e in manifest["embedding_shards"] if e["count"] > 0]
    if not shards:
        raise CopyscanError("the index holds no vectors")
    learned = (manifest.get("whitening") or {}).get("kind") == "learned"
    pair_images = int(manifest.get("config", {}).get("whitening_pair_images", 0)) if learned else 0
    order = np.random.default_rng(seed).permutation(len(shards))[:max_shards]
    taken = 0
    for avoid_pairs in (True, False):
        rng = np.random.default_rng(seed)
        chosen: dict[int, np.ndarray] = {}
        per_shard = -(-images // len(order))
        frees, wants, taken = [], [], 0
        for i in order:
            entry = shards[int(i)]
            n_shards = len(manifest["embedding_shards"])
            first = pair_quota(pair_images, n_shards, entry["shard"]) if avoid_pairs else 0
            free = np.arange(first, entry["count"])
            if keys_of is not None:
                keys = np.asarray(keys_of(entry["shard"]), dtype=object)
                free = free[np.argsort(keys[free], kind="stable")]
            frees.append(free)
            wants.append(min(per_shard, len(free), images - taken))
            taken += wants[-1]
        # a shard with fewer free rows than its share leaves the rest to the shards with rows to spare
        for j, free in enumerate(frees):
            more = min(images - taken, len(free) - wants[j])
            if more > 0:
                wants[j] += more
                taken += more
        for i, free, want in zip(order, frees, wants, strict=True):
            if want > 0:
                chosen[shards[int(i)]["shard"]] = np.sort(rng.choice(free, size=want, replace=False))
        if taken >= min(images, MIN_IMAGES):
            return chosen, not avoid_pairs and pair_images > 0
    raise CopyscanError(f"the index has {taken} image(s): too few to calibrate (at least {MIN_IMAGES})")


def read_back(
    index_url: str,
    manifest: dict[str, Any],
    rows: dict[int, np.ndarray],
    storage_options: storage.StorageOptions | None = None,
) -> Iterator[tuple[int, int, str, Image.Image | None, str | None]]:
    """The training images at ``rows`` ({embedding shard: rows}) read back from the index's source shards, one
    streamed read per shard: (shard, row, key, image, None), or (shard, row, key, None, why) for an image
    that cannot be decoded or is not in its shard any more."""
    entries = {e["shard"]: e for e in manifest["embedding_shards"]}
    for shard, wanted in sorted(rows.items()):
        meta_url = storage.join(index_url, entries[shard]["metadata"])
        keys = pq.read_table(io.BytesIO(storage.read_bytes(meta_url, storage_options)), columns=["key"])
        key_list = keys.column("key").to_pylist()
        row_of = {key_list[r]: int(r) for r in wanted}
        for sample in iter_tar(entries[shard]["source"], storage_options):
            row = row_of.pop(sample.key, None)
            if row is None:
                continue
            try:
                if sample.image is None:
                    raise Rejected("missing_image", "no image member")
                yield shard, row, sample.key, decode_image(sample.image, DecodeLimits()), None
            except Exception as exc:  # noted by the caller, skipped
                yield shard, row, sample.key, None, f"{type(exc).__name__}: {exc}"
            if not row_of:
                break
        for key, row in row_of.items():
            yield shard, row, key, None, "not found in the source shard"
