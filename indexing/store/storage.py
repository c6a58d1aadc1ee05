"""Every path in copyscan is an fsspec URL: a local path, ``file://``, ``s3://`` or any other protocol.

A reader (or a resumed run) never sees half an artifact. On file systems a write goes to a temporary name
next to the target, renamed into place (``os.replace``: atomic, and an error when the target is a folder).
On object stores an upload appears whole when it completes (one PUT, or a multipart upload committed at
its end), so the final name is written directly: a "rename" there would be a full server-side copy.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
import numpy as np

from copyscan.indexing.errors import CopyscanError

# Options passed to every filesystem (e.g. {"endpoint_url": ...} for a private S3). s3fs also honours the
# standard AWS environment (AWS_ENDPOINT_URL_S3, AWS_PROFILE, instance profiles), which is the usual route.
StorageOptions = Mapping[str, Any]

REDACTED = "***"
# Credentials in storage options, by option name (case-insensitive; split into words at camelCase and at every
# character that is not a letter or digit): a name with one of these words (``key``, ``aws_access_key_id``,
# ``account_key``, ``AccountKey``, ``sas_token``, ``client_secret``, ``headers.Authorization``) ...
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "auth", "authorization", "cookie"})
# ... or, run together, one of these parts (``aws_secret_access_key``, ``apikey``, ``credentials``,
# ``connection_string``: Azure's holds the account key).
_SECRET_PARTS = (
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "apikey",
    "accesskey",
    "connection_string",
)


def is_secret_option(name: Any) -> bool:
    """Whether the storage option ``name`` holds a credential: its value is never written or logged.

    Errs on the side of hiding: ``endpoint_url``, ``region_name``, ``anon``, ``use_ssl``, ``profile``,
    ``client_kwargs`` or ``config_kwargs`` are kept; anything named like a key, secret, token, password or
    credential is not (``sse_customer_key``, ``ssekms_key_id`` as well).
    """
    lowered = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).lower()  # SSECustomerKey: sse_customer_key
    words = set(re.split(r"[^a-z0-9]+", lowered))
    return bool(words & _SECRET_WORDS) or any(part in lowered for part in _SECRET_PARTS)


def redact(options: Any) -> Any:
    """A copy of storage options ``options`` in which every credential (``is_secret_option``), at any depth
    of nested dicts and lists (``client_kwargs``, ``headers``), is replaced by ``REDACTED``: what configs,
    manifests and logs record. The options in use keep the real values (``options`` is not changed)."""
    if isinstance(options, Mapping):
        return {
            k: REDACTED if is_secret_option(k) and v not in (None, "") else redact(v)
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    return options


def redact_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (a config as a plain dict) with every ``*storage_options`` entry ``redact``-ed."""
    return {k: redact(v) if str(k).endswith("storage_options") else v for k, v in record.items()}


# What S3 gets when the user's storage options set none of these (README "Retries on object storage"):
# botocore's "standard" retry mode (503 SlowDown, 5xx, throttling, connection and read errors, with jittered
# exponential backoff capped at 20 s) for up to 10 attempts of each request, and time limits per request.
# s3fs wraps each call in its own 5 attempts (body read errors, IncompleteRead), a class constant that
# storage options cannot change (a ``retries`` option is silently ignored by s3fs).
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "retries": {"max_attempts": 10, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 30,
}
READ_ATTEMPTS = 4  # whole-object reads whose body came back short (see ``read_bytes``)


def with_defaults(url: str, storage_options: StorageOptions | None) -> dict[str, Any]:
    """``storage_options`` for ``url`` with copyscan's defaults added where the user set nothing: on
    ``s3://``, ``config_kwargs`` gets each of ``S3_CONFIG_DEFAULTS`` it lacks. The one place they apply."""
    options = dict(storage_options or {})
    if protocol_of(url) in ("s3", "s3a"):
        options["config_kwargs"] = {**S3_CONFIG_DEFAULTS, **(options.get("config_kwargs") or {})}
    return options


def get_fs(url: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-less path for ``url`` (``with_defaults`` applied to the options).

    Listing caches are off: markers written by other processes must be seen by the next listing.
    """
    options = with_defaults(url, storage_options)
    fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the protocol of ``base``."""
    out = base.rstrip("/")
    for part in parts:
        out = posixpath.join(out, part.strip("/"))
    return out


def protocol_of(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def local_path(url: str) -> str:
    """The OS path of a local URL (``file:///a/b`` or ``/a/b``)."""
    if not is_local(url):
        raise CopyscanError(f"{url} is not a local path")
    return url.split("://", 1)[1] if "://" in url else url


def exists(url: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def list_files(url: str, storage_options: StorageOptions | None = None) -> list[str]:
    """All files under ``url`` (recursive), as full URLs, sorted. Empty if it does not exist."""
    fs, path = get_fs(url, storage_options)
    if not fs.exists(path):
        return []
    found = fs.find(path)
    return sorted(_with_protocol(url, fs, p) for p in found)


def _with_protocol(original: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    if "://" not in original:
        return path
    return fs.unstrip_protocol(path)


class TruncatedRead(OSError):
    """A read that returned fewer bytes than the object holds before its end: a body cut short on the way
    (an HTTP client does not always notice). Retried: by ``read_bytes``, and for a tar by the shard's task."""


class CheckedReader(io.RawIOBase):
    """A binary file of known ``size`` whose every ``read(n)`` must return ``min(n, size - position)`` bytes,
    else ``TruncatedRead``: fsspec's files return less only at their end, so a shorter answer is a body cut
    short. Wraps what ``open_checked`` opens; the file stays owned (and closed) by the caller."""

    def __init__(self, f: Any, url: str) -> None:
        super().__init__()
        self._f, self._url = f, url
        self._size = getattr(f, "size", None)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = self._f.read(n)
        if self._size is not None:
            left = self._size - self._pos
            want = left if n is None or n < 0 else min(n, left)
            if len(out) < want:
                raise TruncatedRead(
                    f"{self._url}: {len(out)} bytes read at offset {self._pos} where {want} were due "
                    f"(the object holds {self._size}): a body cut short"
                )
        self._pos += len(out)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def open_checked(
    url: str, storage_options: StorageOptions | None = None, **open_kwargs: Any
) -> Iterator[Any]:
    """``url`` opened for reading through a ``CheckedReader`` (short reads raise ``TruncatedRead``)."""
    fs, path = get_fs(url, storage_options)
    with fs.open(path, "rb", **open_kwargs) as f:
        yield CheckedReader(f, url)


def _transient(exc: BaseException) -> bool:
    # botocore checks a whole object's checksum when the server stored one: a short body fails it.
    return isinstance(exc, TruncatedRead) or type(exc).__name__ == "FlexibleChecksumError"


def read_bytes(url: str, storage_options: StorageOptions | None = None) -> bytes:
    """The whole object at ``url``; its length checked against the object's size. A short body is read
    again (``READ_ATTEMPTS`` times in all, with backoff), then a CopyscanError naming ``url``."""
    for attempt in range(READ_ATTEMPTS):
        try:
            with open_checked(url, storage_options) as f:
                return f.read()
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt + 1 == READ_ATTEMPTS:
                raise CopyscanError(f"reading {url} failed {READ_ATTEMPTS} times: {exc}") from exc
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def read_json(url: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(url, storage_options).decode("utf-8"))


def read_markers(folder: str, prefix: str, storage_options: StorageOptions | None = None) -> dict[int, Any]:
    """Every ``{folder}/{prefix}NNNNN.json`` success marker, by its number (the resume state of a job)."""
    done = {}
    for url in list_files(folder, storage_options):
        name = url.rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".json"):
            done[int(name[len(prefix) : -len(".json")])] = read_json(url, storage_options)
    return done


def _tmp_name(path: str) -> str:
    head, tail = posixpath.split(path)
    # Deterministic per process: a crashed writer's leftover is overwritten by the retry, never accumulated.
    return posixpath.join(head, f".{tail}.tmp-{os.getpid()}")


# Errors of the place written to, not of the data: a user frees space, fixes permissions or the path.
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's limit (ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a parent of the path is not a folder",
    errno.EEXIST: "a parent of the path is not a folder",  # makedirs(exist_ok=True) on a file
    errno.EISDIR: "the path is a folder",
}


@contextmanager
def _writing(url: str, fs: fsspec.AbstractFileSystem, tmp: str | None) -> Iterator[None]:
    """Turn a full disk, a refused permission or a bad path while writing ``url`` into a CopyscanError
    naming ``url``, after removing the temporary file: the final name never appears half-written."""
    try:
        yield
    except OSError as exc:
        reason = _OUTPUT_ERRNOS.get(exc.errno) if isinstance(exc.errno, int) else None
        if reason is None:
            raise
        try:
            if tmp is not None and fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass  # the cause above is what the user needs to see
        raise CopyscanError(f"cannot write {url}: {reason} ({exc.strerror or exc})") from exc


def write_bytes(url: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``url`` atomically: on a file system a temp name renamed into place, on an object
    store one upload at the final name. A full disk, a refused permission or a path through a file is a
    CopyscanError naming ``url``; nothing is left behind."""
    fs, path = get_fs(url, storage_options)
    if not is_local(url):
        with _writing(url, fs, None):
            fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    tmp = _tmp_name(path)
    with _writing(url, fs, tmp):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(local_path(tmp), local_path(path))


def write_json(url: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(
        url,
        (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode(),
        storage_options,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_parquet(url: str, table: Any, storage_options: StorageOptions | None = None) -> None:
    """Write a pyarrow Table as one zstd parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue().to_pybytes(), storage_options)


def upload_file(local: str, url: str, storage_options: StorageOptions | None = None) -> None:
    """Copy a local file to ``url`` atomically: on a file system a temp name renamed into place, on an
    object store one upload at the final name."""
    fs, path = get_fs(url, storage_options)
    if not is_local(url):
        with _writing(url, fs, None):
            fs.put_file(local, path)
        return
    parent = posixpath.dirname(path)
    tmp = _tmp_name(path)
    with _writing(url, fs, tmp):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(local, tmp)
        os.replace(local_path(tmp), local_path(path))


def download_file(url: str, local: str, storage_options: StorageOptions | None = None) -> None:
    """Copy ``url`` to a local file atomically; the local name appears only once the copy is complete."""
    fs, path = get_fs(url, storage_options)
    tmp = f"{local}.tmp-{os.getpid()}"
    with _writing(local, fsspec.filesystem("file"), tmp):
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        _download(fs, path, url, tmp)
    os.replace(tmp, local)


def _download(fs: fsspec.AbstractFileSystem, path: str, url: str, tmp: str) -> None:
    for attempt in range(READ_ATTEMPTS):
        fs.get_file(path, tmp)
        size, got = fs.size(path), os.path.getsize(tmp)
        if size is None or got == size:
            break
        if attempt + 1 == READ_ATTEMPTS:
            os.remove(tmp)
            raise CopyscanError(f"downloading {url} failed {READ_ATTEMPTS} times: {got} of {size} bytes")
        time.sleep(min(0.2 * 2**attempt, 5.0))


def remove(url: str, storage_options: StorageOptions | None = None, recursive: bool = False) -> None:
    fs, path = get_fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@contextmanager
def local_scratch(prefix: str = "copyscan-") -> Iterator[str]:
    """A temporary local directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield tmp


def save_npy(url: str, array: np.ndarray, storage_options: StorageOptions | None = None) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(url, buf.getvalue(), storage_options)


def save_npz(url: str, storage_options: StorageOptions | None = None, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(url, buf.getvalue(), storage_options)


def load_npz(url: str, storage_options: StorageOptions | None = None) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def load_npy(url: str, storage_options: StorageOptions | None = None, mmap: bool = False) -> np.ndarray:
    """Load an .npy; memory-mapped when the URL is local and ``mmap`` is set."""
    if mmap and is_local(url):
        return np.load(local_path(url), mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False)
