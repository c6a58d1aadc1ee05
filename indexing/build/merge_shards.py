"""Merge small index shards into fewer, larger ones (faiss ``merge_ondisk``-style: inverted lists appended).

A finished index whose shards came out small (many tiny embedding-shard groups, or a later decision to
hold fewer shards per scan actor) is repacked without re-reading a vector: consecutive index shards are
grouped up to ``max_shard_vectors`` (``plan_merges``, pure) and each group's inverted lists are appended
into one ``IndexIVF`` (``merge_from``; ids kept, so (shard, row) ids still resolve). Merged shards go to
``index/<name>/merged/shard-NNNNN.index``, each followed by its marker; the manifest is rewritten last, so
an interrupted merge resumes and a reader sees either the old layout or the new one, never a mix.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import faiss

from copyscan.indexing.build.ivf import read_index, write_index
from copyscan.indexing.build.planner import group_shards
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import resolve

MERGED_DIR = "merged"


def merged_shard_url(out: str, factory: str, shard: int) -> str:
    return storage.join(layout.index_dir(out, factory), MERGED_DIR, f"shard-{shard:05d}.index")


def merged_marker_url(out: str, factory: str, shard: int) -> str:
    return storage.join(layout.index_dir(out, factory), MERGED_DIR, f"shard-{shard:05d}.json")


def plan_merges(ntotal: Mapping[int, int], max_shard_vectors: int) -> list[list[int]]:
    """Consecutive index shards (by number) packed into groups of at most ``max_shard_vectors`` vectors."""
    return group_shards(ntotal, max_shard_vectors)


def merge_group(
    out: str,
    factory: str,
    target: int,
    entries: Sequence[dict[str, Any]],
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """Append the inverted lists of the manifest ``entries`` (index shards) into merged shard ``target``.

    Returns its marker (written last); an existing marker for the same sources is returned as is.
    """
    sources = [int(e["index_shard"]) for e in entries]
    marker_url = merged_marker_url(out, factory, target)
    if storage.exists(marker_url, storage_options):
        marker = storage.read_json(marker_url, storage_options)
        if marker.get("merged_from") == sources:
            return marker
    t0 = time.perf_counter()
    index = read_index(resolve(out, entries[0]["path"]), storage_options)
    if faiss.try_extract_index_ivf(index) is None:
        raise CopyscanError(f"{factory}: only IVF index shards can be merged (append inverted lists)")
    ivf = faiss.extract_index_ivf(index)
    for entry in entries[1:]:
        other = read_index(resolve(out, entry["path"]), storage_options)
        ivf.merge_from(faiss.extract_index_ivf(other), 0)  # add_id 0: ids kept
    index.ntotal = ivf.ntotal  # a wrapper (OPQ's IndexPreTransform) does not see its inner index grow
    expected = sum(int(e["ntotal"]) for e in entries)
    if index.ntotal != expected:
        raise CopyscanError(f"merged shard {target:05d} holds {index.ntotal} vectors, expected {expected}")
    url = merged_shard_url(out, factory, target)
    size = write_index(index, url, storage_options)
    marker = {
        "index_shard": target,
        "factory": factory,
        "url": url,
        "ntotal": int(index.ntotal),
        "embedding_shards": [s for e in entries for s in e["embedding_shards"]],
        "id_ranges": [r for e in entries for r in e["id_ranges"]],
        "merged_from": sources,
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(marker_url, marker, storage_options)
    return marker


def merge_index_shards(
    out: str,
    max_shard_vectors: int,
    storage_options: storage.StorageOptions | None = None,
    crash_at: int | None = None,
) -> dict[str, Any]:
    """Repack the finished index at ``out`` into shards of at most ``max_shard_vectors``; returns the new
    manifest (also written). ``crash_at``: stop after that many merged shards (tests prove resume with it).
    """
    manifest_url = storage.join(out, layout.MANIFEST_NAME)
    if not storage.exists(manifest_url, storage_options):
        raise CopyscanError(
            f"{out} has no {layout.MANIFEST_NAME}: finish the index before merging its shards"
        )
    manifest = storage.read_json(manifest_url, storage_options)
    factory = manifest["index"]["factory"]
    entries = {int(e["index_shard"]): e for e in manifest["index_shards"]}
    groups = plan_merges({j: int(e["ntotal"]) for j, e in entries.items()}, max_shard_vectors)
    if len(groups) == len(entries):
        return manifest  # nothing to merge
    new_entries = []
    for target, group in enumerate(groups):
        if crash_at is not None and target >= crash_at:
            raise CopyscanError(f"crash_at={crash_at}: stopped on purpose before merged shard {target:05d}")
        marker = merge_group(out, factory, target, [entries[j] for j in group], storage_options)
        new_entries.append(
            {
                "index_shard": target,
                "path": storage.join(layout.INDEX_DIR, layout.index_name(factory), MERGED_DIR)
                + f"/shard-{target:05d}.index",
                "ntotal": marker["ntotal"],
                "bytes": marker["bytes"],
                "embedding_shards": marker["embedding_shards"],
                "id_ranges": marker["id_ranges"],
                "merged_from": marker["merged_from"],
            }
        )
    manifest["index_shards"] = new_entries
    manifest["merged"] = {"max_shard_vectors": max_shard_vectors, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    storage.write_json(manifest_url, manifest, storage_options)
    return manifest


def keep_merged_layout(previous: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest an index rerun writes: ``manifest`` (fresh from the unmerged shard markers), with the
    merged layout of ``previous`` kept when that layout was merged from exactly these shards of this build.
    Without this, rerunning ``copyscan index`` on a merged index would silently undo the merge."""
    merged_from = sorted(j for e in previous.get("index_shards", []) for j in e.get("merged_from", []))
    if (
        previous.get("merged")
        and previous.get("build_id") == manifest["build_id"]
        and merged_from == sorted(int(e["index_shard"]) for e in manifest["index_shards"])
        and sum(int(e["ntotal"]) for e in previous["index_shards"]) == manifest["ntotal"]
    ):
        return {**manifest, "index_shards": previous["index_shards"], "merged": previous["merged"]}
    return manifest
