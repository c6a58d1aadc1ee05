"""The report's images: the gallery of best matches and the memorised prompts' cliques, with thumbnails
inlined as data URLs (read from the scan's query source and the index's training shards)."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from copyscan.indexing.read import fetch
from copyscan.indexing.read.ranged import training_ranges
from copyscan.search.report import html
from copyscan.search.report.config import ReportConfig

# the matches columns a gallery row carries (those the run has)
GALLERY_COLUMNS = (
    "query_id",
    "rank",
    "train_key",
    "train_url",
    "caption",
    "score",
    "score_norm",
    "score_raw",
    "is_copy",
    "embedding_shard",
    "query_source",
    "query_box",
    "train_box",
    "sha256",  # the training image's provenance (indexing/embed/provenance.py), where its source had it
    "license",
    "pwatermark",
    "punsafe",
    "clip_similarity",
)

Request = tuple[str | None, str]  # (source, key) of an image, as fetch.fetch_images takes it


def thumbnail(data: bytes | None, size: int) -> str | None:
    """A JPEG data URL of the image ``data`` at most ``size`` pixels on its longest side; None when
    there is no data or it does not decode."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale directly
            img = img.convert("RGB")
            img.thumbnail((size, size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=75)
    except Exception:  # noqa: BLE001 - any undecodable image becomes a reason shown in the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(
    requests: list[Request], size: int, so=None, ranges: dict[Request, tuple[int, int]] | None = None
) -> dict[Request, dict[str, str | None]]:
    """(source, key) → {"src": data URL or None, "reason": why not}; ``ranges``: where in their tars the
    training images lie (one ranged read each), as ``fetch.fetch_images`` takes them."""
    fetched = fetch.fetch_images(requests, so, ranges=ranges)
    with ThreadPoolExecutor(max_workers=4) as pool:
        srcs = dict(zip(fetched, pool.map(lambda f: thumbnail(f.data, size), fetched.values()), strict=True))
    out = {}
    for key, f in fetched.items():
        reason = f.reason or (None if srcs[key] else "undecodable")
        out[key] = {"src": srcs[key], "reason": reason}
    return out


def gallery(
    cfg: ReportConfig, table: pa.Table, column: str, manifest: dict[str, Any], index_url: str
) -> dict[str, Any]:
    """The ``cfg.gallery`` best rows of the matches ``table`` by ``column`` (ranks < ``cfg.ranks``), the
    first ``cfg.thumbnails`` with their images inlined.

    Returns {"rows": [match columns + train_source, query_thumb, train_thumb (data URL or None)],
    "thumbnails": how many rows got thumbnails, "missing": {reason: images not shown}}.
    """
    rows = _best_rows(cfg, table, column)
    requests: list[Request] = []
    sources: dict[int, str | None] = {}
    places: dict[int, tuple[int, int]] = {}  # gallery row → (embedding shard, index row) of its image
    for i, row in enumerate(rows):
        shard = int(row["embedding_shard"])
        if shard not in sources:
            sources[shard] = fetch.training_source(manifest, index_url, shard)
        row["train_source"] = sources[shard]
        index_row = row.pop("row", None)  # only to find the image in its tar: not a gallery column
        if i < cfg.thumbnails:
            requests += [(row["query_source"], row["query_id"]), (sources[shard], row["train_key"])]
            if sources[shard] is not None and index_row is not None:
                places[i] = (shard, int(index_row))
    shown: dict[int, list[int]] = {}
    for shard, index_row in places.values():
        shown.setdefault(shard, []).append(index_row)
    where = training_ranges(index_url, shown, cfg.storage_options) if shown else {}
    ranges = {
        (sources[place[0]], rows[i]["train_key"]): where[place]
        for i, place in places.items()
        if place in where
    }
    thumbs = thumbnails(requests, cfg.thumb_size, cfg.storage_options, ranges) if requests else {}
    missing = _attach_thumbnails(rows[: cfg.thumbnails], thumbs)
    for row in rows[cfg.thumbnails :]:
        row["query_thumb"] = row["train_thumb"] = None
    return {"rows": rows, "thumbnails": min(len(rows), cfg.thumbnails), "missing": missing}


def _best_rows(cfg: ReportConfig, table: pa.Table, column: str) -> list[dict[str, Any]]:
    """The gallery's rows as dicts: highest ``column`` first, then by query_id."""
    rows_table = table.filter(pc.less(table["rank"], cfg.ranks))
    order = pc.sort_indices(rows_table, [(column, "descending"), ("query_id", "ascending")])
    rows_table = rows_table.take(order[: cfg.gallery])
    # with each image's index row, which ``gallery`` takes out once it has found the image in its tar
    wanted = [*GALLERY_COLUMNS, "row"]
    return rows_table.select([c for c in wanted if c in rows_table.column_names]).to_pylist()


def _attach_thumbnails(
    rows: list[dict[str, Any]], thumbs: dict[Request, dict[str, str | None]]
) -> dict[str, int]:
    """Sets each row's query_thumb and train_thumb from ``thumbs``; returns {reason: images not shown}."""
    missing: dict[str, int] = {}
    for row in rows:
        for side, source, key in (
            ("query", row["query_source"], row["query_id"]),
            ("train", row["train_source"], row["train_key"]),
        ):
            thumb = thumbs.get((source, key))
            row[f"{side}_thumb"] = thumb["src"] if thumb else None
            if thumb and thumb["reason"]:
                missing[thumb["reason"]] = missing.get(thumb["reason"], 0) + 1
    return missing


def memorized_section(cfg: ReportConfig) -> str:
    """The HTML section of ``cfg.memorized``'s flagged prompts, each with its clique's thumbnails."""
    from copyscan.search.memorized.discover import memorized_for_report

    prompts = memorized_for_report(cfg.memorized, cfg.storage_options, cfg.memorized_prompts)
    requests = [(m["source"], m["key"]) for p in prompts for m in p["members"][: cfg.memorized_images]]
    thumbs = thumbnails(requests, cfg.thumb_size, cfg.storage_options) if requests else {}
    return html.memorized_section(cfg.memorized, prompts, thumbs, cfg.memorized_images)


def scores_section(cfg: ReportConfig, matches: pa.Table) -> str:
    """The HTML section of ``cfg.generations``' highest memorisation scores (``copyscan generate``), each
    prompt with its clique (``cfg.memorized``) and its generations' best match in this run."""
    from copyscan.indexing.store import layout, storage
    from copyscan.search.generate.scores import read_prompt_scores, top_prompts

    scores = read_prompt_scores(cfg.generations, cfg.storage_options)
    memorized = None
    if cfg.memorized:
        url = storage.join(cfg.memorized, layout.MEMORIZED_RESULT_NAME)
        memorized = pq.read_table(io.BytesIO(storage.read_bytes(url, cfg.storage_options)))
    if scores is None:
        return html.scores_section(cfg.generations, [])
    best = matches.filter(pc.equal(matches["rank"], 0))
    return html.scores_section(cfg.generations, top_prompts(scores, best, memorized, cfg.memorized_prompts))
