"""Re-fetch original images by key: training images from the index's source shards, generations from queries.

Reports (side-by-side gallery) and pixel verification need the original bytes of a few matched images.
Requests are grouped per source, and each source is read once: the images of a tar whose place in it the
index recorded are read with one ranged read each (``ranged``), the rest by streaming the tar until every
wanted key has been seen (never one request per image); an image file is read whole. Sources are read
in parallel threads (the work is I/O). Every request gets an answer: the bytes, or the reason why not.

A source is either a tar (``*.tar``: the key selects the sample) or a single image file (the key is the
query id and only labels the result).

Sources come from the index's manifest (the shards the user indexed) and from a scan's matches (the query
files the user scanned), never from a sample's metadata (its ``url`` is shown as a link, never fetched).
Even so a source is read only when it is a local path or its protocol is one of ``ALLOWED_PROTOCOLS``
(http(s) and the object stores). An image file is read only up to ``MAX_SOURCE_BYTES``, and each source
gets ``SOURCE_TIMEOUT`` seconds; past either it is answered with a reason.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.ranged import read_ranges
from copyscan.indexing.read.reader import MAX_MEMBER_BYTES, iter_tar
from copyscan.indexing.store import storage

# Why a requested image has no bytes (stable codes, counted in reports).
NO_SOURCE = "no_source"  # the index holds no source shard for it (e.g. imported CLIP embeddings)
SOURCE_UNREADABLE = "source_unreadable"
KEY_NOT_FOUND = "key_not_found"
NO_IMAGE = "no_image"  # the sample exists but holds no image member
SOURCE_NOT_ALLOWED = "source_not_allowed"  # a protocol not in ALLOWED_PROTOCOLS: never opened
SOURCE_TOO_LARGE = "source_too_large"  # an image file over MAX_SOURCE_BYTES: not read
SOURCE_TIMED_OUT = "source_timeout"  # not read within SOURCE_TIMEOUT seconds

ALLOWED_PROTOCOLS = frozenset({"http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf"})
LOCAL_PROTOCOLS = frozenset({"file", "local"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # data:, javascript: and s3:// alike
# one image file: the reader's limit on an image (a tar is streamed, and only its wanted members kept)
MAX_SOURCE_BYTES = MAX_MEMBER_BYTES
SOURCE_TIMEOUT = 600.0  # seconds for one source: a whole shard streamed until its wanted keys are seen


@dataclass(frozen=True)
class Fetched:
    """The answer to one request: ``data`` (encoded image) or ``reason`` (+ ``detail``)."""

    source: str | None
    key: str
    data: bytes | None = None
    image_format: str | None = None
    reason: str | None = None
    detail: str = ""


def is_tar(source: str) -> bool:
    return source.lower().endswith(".tar")


def _read_source(
    source: str,
    keys: set[str],
    storage_options: storage.StorageOptions | None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Fetched]:
    found: dict[str, Fetched] = {}
    try:
        if ranges and is_tar(source):
            for key, (data, fmt) in read_ranges(source, ranges, storage_options).items():
                found[key] = Fetched(source, key, data=data, image_format=fmt)
            if len(found) == len(keys):
                return found
        if not is_tar(source):
            fs, path = storage.get_fs(source, storage_options)
            size = fs.size(path)
            if size is not None and size > MAX_SOURCE_BYTES:
                detail = f"{size} bytes, more than {MAX_SOURCE_BYTES}"
                return {key: Fetched(source, key, reason=SOURCE_TOO_LARGE, detail=detail) for key in keys}
            data = storage.read_bytes(source, storage_options)
            fmt = source.rsplit(".", 1)[-1].lower() if "." in source.rsplit("/", 1)[-1] else None
            return {key: Fetched(source, key, data=data, image_format=fmt) for key in keys}
        for sample in iter_tar(source, storage_options):
            if sample.key not in keys or sample.key in found:
                continue
            if sample.image is None:
                found[sample.key] = Fetched(source, sample.key, reason=NO_IMAGE)
            else:
                found[sample.key] = Fetched(
                    source, sample.key, data=sample.image, image_format=sample.image_format
                )
            if len(found) == len(keys):
                break  # stop streaming: the rest of the shard is not needed
    except (OSError, CopyscanError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
        return {
            key: found.get(key) or Fetched(source, key, reason=SOURCE_UNREADABLE, detail=detail)
            for key in keys
        }
    for key in keys - found.keys():
        found[key] = Fetched(source, key, reason=KEY_NOT_FOUND, detail=f"no sample {key!r} in {source}")
    return found


def allowed(source: str) -> bool:
    """Whether ``source`` may be read: a URL of ``ALLOWED_PROTOCOLS`` or a local path (as the user indexed
    or scanned it); never another fsspec protocol (``memory``, ``data``, ``ftp``, ``ssh``, chained URLs)."""
    if "::" in source:  # a chain of file systems (simplecache::, zip::)
        return False
    scheme = _SCHEME.match(source)
    if scheme is None:
        return True  # a plain local path
    return "://" in source and scheme.group(1).lower() in ALLOWED_PROTOCOLS | LOCAL_PROTOCOLS


def fetch_images(
    requests: Iterable[tuple[str | None, str]],
    storage_options: storage.StorageOptions | None = None,
    threads: int = 8,
    timeout: float = SOURCE_TIMEOUT,
    ranges: Mapping[tuple[str | None, str], tuple[int, int]] | None = None,
) -> dict[tuple[str | None, str], Fetched]:
    """Fetch ``(source, key)`` pairs; every distinct request gets exactly one ``Fetched`` in the result.

    A source of a protocol not ``allowed`` is never opened (``SOURCE_NOT_ALLOWED``); one not read within
    ``timeout`` seconds of the fetch's start is answered ``SOURCE_TIMED_OUT`` (its thread is left to end).
    ``ranges``: {request: (offset, size)} of training images whose bytes' place in their tar is known
    (``ranged.training_ranges``): each is read with one ranged read, the tar streamed only for the others.
    """
    by_source: dict[str | None, set[str]] = defaultdict(set)
    for source, key in requests:
        by_source[source].add(key)
    out: dict[tuple[str | None, str], Fetched] = {}
    for key in by_source.pop(None, set()):
        out[(None, key)] = Fetched(None, key, reason=NO_SOURCE)
    for source in [s for s in by_source if not allowed(s)]:
        for key in by_source.pop(source):
            out[(source, key)] = Fetched(
                source, key, reason=SOURCE_NOT_ALLOWED, detail="protocol not allowed"
            )
    if not by_source:
        return out
    pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(by_source))))
    deadline = time.monotonic() + timeout
    try:
        futures = {
            src: pool.submit(_read_source, src, keys, storage_options, _of_source(ranges, src, keys))
            for src, keys in by_source.items()
        }
        for src, future in futures.items():
            try:
                answers = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                detail = f"not read within {timeout:g} s"
                answers = {k: Fetched(src, k, reason=SOURCE_TIMED_OUT, detail=detail) for k in by_source[src]}
            for key, fetched in answers.items():
                out[(src, key)] = fetched
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def _of_source(
    ranges: Mapping[tuple[str | None, str], tuple[int, int]] | None, source: str, keys: set[str]
) -> dict[str, tuple[int, int]]:
    if not ranges:
        return {}
    return {key: ranges[(source, key)] for key in keys if (source, key) in ranges}


def training_source(manifest: dict[str, Any], index_url: str, embedding_shard: int) -> str | None:
    """URL of the tar that embedding shard ``embedding_shard`` of an index was made from (None: no images)."""
    shards = manifest.get("embedding_shards") or []
    if not 0 <= embedding_shard < len(shards):
        raise CopyscanError(
            f"embedding shard {embedding_shard} is not in the manifest of {index_url} ({len(shards)} shards)"
        )
    source = shards[embedding_shard].get("source")
    if not source or not is_tar(source):
        return None  # imported embeddings (laion-clip) carry no images
    return source
