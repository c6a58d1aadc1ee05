"""Turn a ``--shards`` / ``--queries`` argument into a list of URLs.

Accepted forms (any fsspec protocol):
- a brace pattern: ``s3://bucket/laion/{00000..00099}.tar`` (webdataset/braceexpand syntax),
- a glob: ``/data/laion/*.tar``,
- a folder: every ``*.tar`` directly inside it (img2dataset's output folder),
- a list file (``.txt``/``.lst``/``.list``): one URL per line, ``#`` comments allowed.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field

import braceexpand

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage

# Names that make a folder "of images" when it also holds .tar shards (refused as a mix); a folder of images
# takes files of every name, their content decides.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
# Files of a folder of images that are not queries by their name: the sidecars a folder of generations
# keeps beside its images (prompts, ground truth, notes). Skipped and named in the scan's summary.
METADATA_EXTENSIONS = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".parquet", ".yaml", ".yml", ".md")


def _has_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def expand_shards(spec: str, storage_options: storage.StorageOptions | None = None) -> list[str]:
    """Expand ``spec`` into the list of webdataset tar URLs it names, in a stable order.

    Raises CopyscanError when nothing matches or when a braced/listed shard does not exist.
    """
    spec = spec.strip()
    if not spec:
        raise CopyscanError("empty shard specification")
    if "{" in spec and ".." in spec:
        urls = list(braceexpand.braceexpand(spec))
        _check_exist(spec, urls, storage_options)
        return urls
    if _has_glob(spec):
        fs, path = storage.get_fs(spec, storage_options)
        urls = sorted(storage._with_protocol(spec, fs, p) for p in fs.glob(path))
        if not urls:
            raise CopyscanError(f"no file matches {spec}")
        return urls
    fs, path = storage.get_fs(spec, storage_options)
    if not fs.exists(path):
        raise CopyscanError(f"{spec} does not exist")
    if fs.isdir(path):
        urls = [u for u in storage.list_files(spec, storage_options) if _is_top_level_tar(spec, u)]
        if not urls:
            raise CopyscanError(f"folder {spec} holds no .tar shards")
        return urls
    if spec.lower().endswith(LIST_EXTENSIONS):
        text = storage.read_bytes(spec, storage_options).decode("utf-8")
        urls = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not urls:
            raise CopyscanError(f"list file {spec} names no shard")
        _check_exist(spec, urls, storage_options)
        return urls
    if spec.lower().endswith(".tar"):
        return [spec]
    raise CopyscanError(
        f"{spec} is neither a .tar shard, a folder of shards, a brace pattern nor a list file"
    )


def _is_top_level_tar(folder: str, url: str) -> bool:
    rel = (
        url[len(folder.rstrip("/")) + 1 :] if url.startswith(folder.rstrip("/")) else posixpath.basename(url)
    )
    return url.endswith(".tar") and "/" not in rel and not posixpath.basename(url).startswith(".")


def _check_exist(spec: str, urls: Sequence[str], storage_options: storage.StorageOptions | None) -> None:
    # One listing per parent folder instead of one request per shard (thousands of shards on S3).
    by_parent: dict[str, list[str]] = {}
    for url in urls:
        by_parent.setdefault(posixpath.dirname(url), []).append(url)
    missing: list[str] = []
    for parent, members in by_parent.items():
        fs, path = storage.get_fs(parent, storage_options)
        try:
            present = {posixpath.basename(p) for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            present = set()
        missing.extend(u for u in members if posixpath.basename(u) not in present)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CopyscanError(f"{len(missing)} of {len(urls)} shards named by {spec} do not exist: {shown}")


@dataclass(frozen=True)
class QueryListing:
    """What ``--queries`` names: ``kind`` "images" (files, query_id = path relative to the folder) or
    "shards" (webdataset tars, query_id = ``__key__``), their URLs in a stable order, and the files of a
    query folder that are not queries, each ``{"file", "reason"}`` (relative name; reason ``hidden``: a
    dot-file or one in a dot-folder; ``metadata_file``: named as a sidecar, ``METADATA_EXTENSIONS``;
    ``not_a_shard``: beside the .tar shards of a folder of shards)."""

    kind: str
    urls: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)


def list_queries(spec: str, storage_options: storage.StorageOptions | None = None) -> QueryListing:
    """The queries ``spec`` names (``QueryListing``).

    A folder without top-level ``.tar`` files is a folder of images: every file in it, at any depth and of
    any name, is a query whose content decides whether it is an image (one Pillow cannot open becomes a
    rejection with its reason), hidden files and sidecars (``METADATA_EXTENSIONS``) excepted. A folder with top-level tars is a folder of shards
    (img2dataset's output: its parquet and stats files are skipped), unless it also holds files named as
    images, which is refused. A pattern or a list file names shards.
    """
    fs, path = storage.get_fs(spec, storage_options)
    if _has_glob(spec) or "{" in spec or not fs.exists(path) or not fs.isdir(path):
        return QueryListing("shards", expand_shards(spec, storage_options))
    files = storage.list_files(spec, storage_options)
    hidden = [u for u in files if _hidden(spec, u)]
    visible = [u for u in files if not _hidden(spec, u)]
    tars = [u for u in visible if _is_top_level_tar(spec, u)]
    skipped = [{"file": relative_name(spec, u), "reason": "hidden"} for u in hidden]
    if not tars:
        images = [u for u in visible if not u.lower().endswith(METADATA_EXTENSIONS)]
        sidecars = [u for u in visible if u.lower().endswith(METADATA_EXTENSIONS)]
        skipped += [{"file": relative_name(spec, u), "reason": "metadata_file"} for u in sidecars]
        if not images:
            raise CopyscanError(f"query folder {spec} holds neither image files nor .tar shards")
        return QueryListing("images", images, sorted(skipped, key=lambda s: s["file"]))
    if any(u.lower().endswith(IMAGE_EXTENSIONS) for u in visible):
        raise CopyscanError(f"query folder {spec} mixes image files and .tar shards; point at one kind")
    shards = set(tars)
    skipped += [{"file": relative_name(spec, u), "reason": "not_a_shard"} for u in visible if u not in shards]
    return QueryListing("shards", tars, sorted(skipped, key=lambda s: s["file"]))


def expand_queries(spec: str, storage_options: storage.StorageOptions | None = None) -> tuple[str, list[str]]:
    """``list_queries``' kind and URLs: ``("images", [file URLs])`` or ``("shards", [tar URLs])``."""
    listing = list_queries(spec, storage_options)
    return listing.kind, listing.urls


def _hidden(folder: str, url: str) -> bool:
    rel = relative_name(folder, url)
    return any(part.startswith(".") for part in rel.split("/"))


def relative_name(folder: str, url: str) -> str:
    """``url`` relative to ``folder`` ('a/b.jpg'), used as the query id of image files."""
    base = folder.rstrip("/") + "/"
    if url.startswith(base):
        return url[len(base) :]
    # fsspec may normalise the protocol part (file:// vs plain path); compare protocol-less paths.
    _, base_path = storage.get_fs(folder)
    _, path = storage.get_fs(url)
    base_path = base_path.rstrip("/") + "/"
    if path.startswith(base_path):
        return path[len(base_path) :]
    return posixpath.basename(url)
