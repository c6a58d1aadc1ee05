"""Stream samples out of webdataset tars (img2dataset output) and out of folders of image files.

Tar bytes are read through fsspec, so ``s3://`` and every other protocol work (webdataset itself has no
s3 opener), and are expanded sequentially with ``tarfile`` (``iter_members``) and grouped into samples the
way webdataset groups them (``group_samples``: one ``{key}.jpg + .txt + .json`` at a time): a shard is never
held in memory whole. The two steps are separate so that each member's place in the tar (``Member.offset``)
is known to whatever needs it. A hostile member (a name that leaves the shard, a link, a key seen before)
never becomes a path: its sample is yielded with ``problem`` set and no image, a counted rejection.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# webdataset's split of a member name into (key, extensions): the key ends at the first dot of the last part
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# A member is read into memory whole; a larger one is rejected unread (an image of max_image_pixels is smaller).
MAX_MEMBER_BYTES = 256 * 1024 * 1024

# Rejection reasons of samples a tar holds but cannot give (``Sample.problem`` is "reason: detail").
UNSAFE_NAME = "unsafe_name"
LINK_MEMBER = "not_a_regular_file"
MEMBER_TOO_LARGE = "too_large_file"
DUPLICATE_KEY = "duplicate_key"
NO_EXTENSION = "no_extension"
TAR_PROBLEMS = (UNSAFE_NAME, LINK_MEMBER, MEMBER_TOO_LARGE, DUPLICATE_KEY, NO_EXTENSION)


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
    # Where the image member's bytes start in an uncompressed tar (``len(image)`` bytes from there): what
    # ``fetch`` reads back with one ranged read. None for image files and compressed tars.
    image_offset: int | None = None


def iter_tar(url: str, storage_options: storage.StorageOptions | None = None) -> Iterator[Sample]:
    """Yield the samples of one webdataset tar, in file order.

    Every sample of the tar comes out, a hostile one with ``problem`` set and no image (rejected with that
    reason, ``TAR_PROBLEMS``): nothing is extracted to a path, so a member's name is only ever a key. A tar
    that is corrupt or truncated raises CopyscanError (the shard fails and is retried / reported); the
    samples already yielded stay valid.
    """
    fs, path = storage.get_fs(url, storage_options)
    try:
        raw = fs.open(path, "rb", block_size=8 * 1024 * 1024)
    except FileNotFoundError:
        raise CopyscanError(f"shard {url} does not exist") from None
    with raw:
        # A body cut short on the way raises TruncatedRead (below: the shard fails, its task is retried).
        stream = storage.CheckedReader(raw, url)
        try:
            yield from group_samples(iter_members(stream))
        except CopyscanError:
            raise
        except OSError as exc:  # the store failed past its retries, or a body came back cut short
            raise CopyscanError(f"shard {url} could not be read: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # tarfile.ReadError, EOFError, zlib.error, ...
            raise CopyscanError(f"shard {url} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Member:
    """One file of a tar: its name, its bytes (None when not read: ``problem`` says why), where its bytes
    start in the tar (None in a compressed tar, whose offsets are not the file's), and why it cannot be used
    (None if fine)."""

    name: str
    data: bytes | None
    offset: int | None
    problem: str | None = None


def iter_members(stream: IO[bytes]) -> Iterator[Member]:
    """The members of a tar read sequentially from ``stream`` (plain or compressed), folders left out."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        plain = getattr(tar.fileobj, "comptype", "tar") == "tar"  # offsets are the stream's own
        for info in tar:
            if info.isdir():
                continue
            problem = _member_problem(info)
            data = None
            if problem is None:
                extracted = tar.extractfile(info)
                data = extracted.read() if extracted is not None else b""
            yield Member(info.name, data, info.offset_data if plain else None, problem)


def _member_problem(info: tarfile.TarInfo) -> str | None:
    if unsafe_name(info.name):
        return f"{UNSAFE_NAME}: member name {info.name!r} is absolute or leaves the shard"
    if info.issym() or info.islnk():
        kind = "symlink" if info.issym() else "hardlink"
        return f"{LINK_MEMBER}: {info.name!r} is a {kind} to {info.linkname!r}"
    if not info.isreg():
        return f"{LINK_MEMBER}: {info.name!r} is not a regular file (tar type {info.type!r})"
    if info.size > MAX_MEMBER_BYTES:
        return f"{MEMBER_TOO_LARGE}: {info.name!r} has {info.size:,} bytes (limit {MAX_MEMBER_BYTES:,})"
    return None


def unsafe_name(name: str) -> bool:
    """Whether a member name is absolute, climbs out with ``..`` or holds control characters."""
    parts = name.replace("\\", "/").split("/")
    return (
        name.startswith(("/", "\\"))
        or (len(name) > 1 and name[1] == ":")
        or ".." in parts
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    )


def group_samples(members: Iterable[Member]) -> Iterator[Sample]:
    """Consecutive members sharing a key (the name up to the first dot of its last part) → one sample.

    A key seen before in the tar, or an extension repeated within a sample, starts a sample rejected as
    ``duplicate_key`` (the first one wins); a member with a problem makes its sample a rejection.
    """
    seen: set[str] = set()
    key: str | None = None
    parts: dict[str, bytes] = {}
    offsets: dict[str, int | None] = {}
    problem: str | None = None
    for member in members:
        match = _KEY_EXT.match(member.name)
        name_key, ext = (match.group(1), match.group(2).lower()) if match else (member.name, "")
        if name_key != key or ext in parts:
            if key is not None:
                yield _finish(key, parts, offsets, problem, seen)
            key, parts, offsets, problem = name_key, {}, {}, None
        if problem is None:
            problem = member.problem or (None if match else f"{NO_EXTENSION}: {member.name!r}")
        parts[ext] = member.data if member.data is not None else b""
        offsets[ext] = member.offset
    if key is not None:
        yield _finish(key, parts, offsets, problem, seen)


def _finish(
    key: str, parts: dict[str, bytes], offsets: dict[str, int | None], problem: str | None, seen: set[str]
) -> Sample:
    if problem is None and key in seen:
        problem = f"{DUPLICATE_KEY}: {key!r} appears again in the shard (members {sorted(parts)})"
    seen.add(key)
    if problem is not None:
        return Sample(key=key, image=None, image_format=None, problem=problem)
    sample = _sample_from_members({"__key__": key, **parts})
    if sample.image_format is not None:
        sample.image_offset = offsets.get(sample.image_format)
    return sample


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
    if image is None and problem is None:
        others = ", ".join(sorted(k for k in raw if k != "__key__")) or "none"
        problem = f"missing_image: no image member (members: {others})"
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
            # a body cut short raises TruncatedRead: the chunk fails and is retried
            with storage.open_checked(url, storage_options) as f:
                data = f.read(MAX_MEMBER_BYTES + 1)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            # The file itself is unusable; a storage fault (connection, throttling) fails the chunk instead,
            # which is retried, rather than turning a query into a rejection a clean run would not make.
            yield Sample(key=key, image=None, image_format=fmt, url=url, problem=f"unreadable_file: {exc}")
            continue
        if len(data) > MAX_MEMBER_BYTES:
            problem = f"{MEMBER_TOO_LARGE}: {url} has more than {MAX_MEMBER_BYTES:,} bytes"
            yield Sample(key=key, image=None, image_format=fmt, url=url, problem=problem)
            continue
        yield Sample(key=key, image=data, image_format=fmt, url=url)
