"""LAION's precomputed CLIP embeddings, imported into an index without touching an image.

LAION publishes CLIP image embeddings of its datasets in clip-retrieval's layout::

    FOLDER/img_emb/img_emb_0.npy              (n, d) float16, L2-normalised, one row per image
    FOLDER/metadata/metadata_0.parquet        n rows in the same order: url, caption, key, width, height, ...

``copyscan index --shards FOLDER embedder=laion-clip embedder_options={model: ViT-L-14}`` turns each part into
one embedding shard of the index (vectors re-normalised and stored float16, metadata mapped to copyscan's
columns, the stats marker last), so billions of images are indexed at the speed of reading them. The
vectors' model is not in the files: ``model`` names it, and queries must be embedded by that same CLIP
image encoder (``weights=ENCODER.torchscript.pt``, or an open_clip checkpoint with the ``[clip]`` extra, at
scan time; see ``ClipEmbedder``). Without images there are no augmented pairs, so the index is PCA-whitened
(recorded as a fallback), and ``copyscan calibrate`` (which copies training images) does not apply: give a
threshold instead.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from copyscan.indexing.embed.provenance import PROVENANCE, provenance
from copyscan.indexing.embed.stage import EmbeddedSource, write_shard_outputs
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage

_PART = re.compile(r"img_emb_(\d+)\.npy$")


def list_parts(folder: str, storage_options: storage.StorageOptions | None = None) -> list[tuple[str, str]]:
    """(img_emb URL, metadata URL) of every part under ``folder``, ordered by part number."""
    emb_dir, meta_dir = storage.join(folder, "img_emb"), storage.join(folder, "metadata")
    found = []
    for url in (
        storage.list_files(emb_dir, storage_options) if storage.exists(emb_dir, storage_options) else []
    ):
        match = _PART.search(url.rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), url))
    if not found:
        raise CopyscanError(
            f"no img_emb/img_emb_N.npy under {folder}: not a clip-retrieval embeddings folder"
        )
    parts = []
    for number, url in sorted(found):
        meta = storage.join(meta_dir, f"metadata_{number}.parquet")
        if not storage.exists(meta, storage_options):
            raise CopyscanError(f"{url} has no metadata part {meta}")
        parts.append((url, meta))
    return parts


def npy_shape(url: str, storage_options: storage.StorageOptions | None = None) -> tuple[int, ...]:
    """The shape in an .npy file's header, reading only its first bytes (parts can be gigabytes)."""
    fs, path = storage.get_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read(f)
    return tuple(shape)


_TEXT = ("url", "caption")
_INTS = ("width", "height", "original_width", "original_height")


def _records(meta, shard: int) -> list[dict[str, Any]]:
    columns = set(meta.column_names)
    data = {name: meta.column(name).to_pylist() for name in columns}
    n = meta.num_rows
    if "key" in columns:
        keys = [str(k) if k is not None else None for k in data["key"]]
    elif "image_path" in columns:
        keys = [str(k) if k is not None else None for k in data["image_path"]]
    else:
        keys = [None] * n
    sources = [name for names in PROVENANCE.values() for name in names if name in columns]
    records = []
    for row in range(n):
        record: dict[str, Any] = {"key": keys[row] or f"{shard:05d}{row:07d}"}
        for name in _TEXT:
            record[name] = data[name][row] if name in columns else None
        for name in _INTS:
            value = data[name][row] if name in columns else None
            record[name] = int(value) if isinstance(value, (int, float)) and value == value else None
        record.update(provenance({name: data[name][row] for name in sources}))
        records.append(record)
    return records


def import_part(
    out: str,
    shard: int,
    emb_url: str,
    meta_url: str,
    fingerprint: str,
    dim: int,
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """One clip-retrieval part → embedding shard ``shard`` of ``out`` (vectors, metadata, marker last)."""
    x = storage.load_npy(emb_url, storage_options)
    if x.ndim != 2 or x.shape[1] != dim:
        raise CopyscanError(f"{emb_url} holds shape {x.shape}, expected (n, {dim}) like the first part")
    meta = pq.read_table(io.BytesIO(storage.read_bytes(meta_url, storage_options)))
    if meta.num_rows != len(x):
        raise CopyscanError(f"{meta_url} has {meta.num_rows} rows for {len(x)} vectors in {emb_url}")
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    good = np.isfinite(x).all(axis=1) & (norms > 1e-6)
    records = _records(meta, shard)
    rejections = [
        {"key": records[i]["key"], "reason": "bad_vector", "detail": "zero or non-finite embedding"}
        for i in np.nonzero(~good)[0]
    ]
    kept = [r for r, ok in zip(records, good, strict=True) if ok]
    result = EmbeddedSource(x[good] / norms[good, None], kept, rejections)
    return write_shard_outputs(
        out, shard, emb_url, result, fingerprint, storage_options, {"imported_from": {"metadata": meta_url}}
    )
