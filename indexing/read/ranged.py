"""Training images read back by their place in the source tar: one ranged read each, not the whole tar.

The embedding stage records, for every image of an uncompressed tar, where its member's bytes start and how
many there are (``tar_offset``, ``tar_size`` in the embedding metadata, from ``Sample.image_offset``). A
LAION shard holds about 10,000 images, and a scan's matches name a few of them: streaming the tar up to the
last wanted key reads most of it for each; a ranged read (S3/GCS range GET, HTTP ``Range``, a local seek)
reads the image and the 512-byte tar header before it. The header names the member, so a tar rewritten since
it was indexed is noticed (the key is then looked up by streaming, as for an index built before offsets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from copyscan.indexing.store import layout, storage

TAR_BLOCK = 512  # a tar header; the member's data follows it


def member_name(header: bytes) -> str | None:
    """The member name a 512-byte ustar/GNU header holds (``prefix/name``), None if it is not a header."""
    if len(header) != TAR_BLOCK or header[257:262] not in (b"ustar", b"") or not header[:1].strip(b"\0"):
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    try:
        return ((prefix + b"/" if prefix else b"") + name).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _names_key(name: str | None, key: str) -> bool:
    if name is None:
        return False
    base = name.rsplit("/", 1)[-1]
    return base.startswith(key + ".") and "." not in base[len(key) + 1 :]


def read_ranges(
    source: str,
    wanted: Mapping[str, tuple[int, int]],
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, tuple[bytes, str]]:
    """{key: (image bytes, the member's extension)} for the keys of ``wanted`` ({key: (offset, size)}) whose
    ranged read of ``source`` gave a header naming that key and ``size`` bytes after it; the others are left
    out (read them by streaming). All ranges of the source go out at once (``cat_ranges``: concurrent on object stores)."""
    keys = [k for k, (offset, _) in wanted.items() if offset >= TAR_BLOCK]
    if not keys:
        return {}
    fs, path = storage.get_fs(source, storage_options)
    starts = [wanted[k][0] - TAR_BLOCK for k in keys]
    ends = [wanted[k][0] + wanted[k][1] for k in keys]
    blobs = fs.cat_ranges([path] * len(keys), starts, ends, on_error="return")
    out: dict[str, tuple[bytes, str]] = {}
    for key, blob, start, end in zip(keys, blobs, starts, ends, strict=True):
        if not isinstance(blob, bytes) or len(blob) != end - start:
            continue  # an error or a short read: streamed instead
        name = member_name(blob[:TAR_BLOCK])
        if name is not None and _names_key(name, key):
            out[key] = (blob[TAR_BLOCK:], name.rsplit(".", 1)[-1].lower())
    return out


def training_ranges(
    index_url: str,
    rows_by_shard: Mapping[int, Any],
    storage_options: storage.StorageOptions | None = None,
) -> dict[tuple[int, int], tuple[int, int]]:
    """{(embedding shard, row): (tar offset, size)} of the given rows, from the index's embedding metadata;
    rows of an index built before offsets were recorded (or of compressed tars, or whose metadata is gone) are
    left out."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for shard, rows in rows_by_shard.items():
        url = layout.metadata_url(index_url, int(shard))
        fs, path = storage.get_fs(url, storage_options)
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                if "tar_offset" not in parquet.schema_arrow.names:
                    continue
                table = parquet.read(columns=["tar_offset", "tar_size"])
        except FileNotFoundError:
            continue  # no metadata to say where: the fetch streams the tar and answers for the key
        offsets = table.column("tar_offset").to_numpy(zero_copy_only=False)
        sizes = table.column("tar_size").to_numpy(zero_copy_only=False)
        for row in np.unique(np.asarray(list(rows), dtype=np.int64)):
            if 0 <= row < len(offsets) and not np.isnan(offsets[row]) and not np.isnan(sizes[row]):
                out[(int(shard), int(row))] = (int(offsets[row]), int(sizes[row]))
    return out
