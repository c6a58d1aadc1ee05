"""Stream samples out of webdataset tars (img2dataset output) and out of folders of image files.

Tar bytes are read through fsspec, so ``s3://`` and every other protocol work (webdataset itself has no
s3 opener), and are expanded with webdataset's tar iterators, one sample (``{key}.jpg + .txt + .json``)
at a time: a shard is never held in memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from webdataset import tariterators

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class Sample:
    """One record of a shard: its key, the encoded image (or None) and its metadata."""

    key: str
    image: bytes | None
    image_format: str | None
    caption: str | None = None
    url: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Why the sample cannot be used even before decoding (e.g. unreadable JSON); None if fine.
    problem: str | None = None


def iter_tar(url: str, storage_options: storage.StorageOptions | None = None) -> Iterator[Sample]:
    """Yield the samples of one webdataset tar, in file order.

    A tar that is corrupt or truncated raises CopyscanError (the shard fails and is retried / reported);
    the samples already yielded stay valid.
    """
    fs, path = storage.get_fs(url, storage_options)
    try:
        raw = fs.open(path, "rb", block_size=8 * 1024 * 1024)
    except FileNotFoundError:
        raise CopyscanError(f"shard {url} does not exist") from None
    with raw:
        # A body cut short on the way raises TruncatedRead (below: the shard fails, its task is retried).
        stream = storage.CheckedReader(raw, url)
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        grouped = tariterators.group_by_keys(files)
        try:
            for raw in grouped:
                yield _sample_from_members(raw)
        except CopyscanError:
            raise
        except OSError as exc:  # the store failed past its retries, or a body came back cut short
            raise CopyscanError(f"shard {url} could not be read: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # tarfile.ReadError, EOFError, ValueError on duplicate names, ...
            raise CopyscanError(f"shard {url} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc


def _sample_from_members(raw: dict[str, Any]) -> Sample:
    key = raw["__key__"]
    image, fmt = None, None
    for ext in IMAGE_KEYS:
        if ext in raw:
            image, fmt = raw[ext], ext
            break
    meta: dict[str, Any] = {}
    problem = None
    if "json" in raw:
        try:
            loaded = json.loads(raw["json"])
            if isinstance(loaded, dict):
                meta = loaded
            else:
                problem = "metadata_not_a_mapping"
        except (ValueError, UnicodeDecodeError):
            problem = "bad_metadata_json"
    caption = None
    if "txt" in raw:
        caption = raw["txt"].decode("utf-8", errors="replace")
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    return Sample(
        key=key, image=image, image_format=fmt, caption=caption, url=url, meta=meta, problem=problem
    )


def iter_image_files(
    urls: Sequence[str], keys: Sequence[str], storage_options: storage.StorageOptions | None = None
) -> Iterator[Sample]:
    """Yield one sample per image file; ``keys[i]`` is the sample key (the query id) of ``urls[i]``.

    A file that cannot be read is yielded with ``problem`` set, never dropped.
    """
    if len(urls) != len(keys):
        raise ValueError("urls and keys differ in length")
    if not urls:
        return
    for url, key in zip(urls, keys, strict=True):
        _, path = storage.get_fs(url, storage_options)
        fmt = path.rsplit(".", 1)[-1].lower() if "." in path else None
        try:
            data = storage.read_bytes(url, storage_options)  # a short body is read again
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            # The file itself is unusable; a storage fault (connection, throttling) fails the chunk instead,
            # which is retried, rather than turning a query into a rejection a clean run would not make.
            yield Sample(key=key, image=None, image_format=fmt, url=url, problem=f"unreadable_file: {exc}")
            continue
        yield Sample(key=key, image=data, image_format=fmt, url=url)
