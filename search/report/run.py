"""``copyscan report RUN``: replication statistics, duplicate counts and a self-contained HTML report.

Outputs (``OUT`` defaults to ``RUN/report``)::

    OUT/stats.json             both distributions per score column: mean, std, p75/90/95, fraction ≥ each
                               threshold with bootstrap 95 % intervals; mean shift; duplicates summary
    OUT/histograms.parquet     column, distribution, bin_lo, bin_hi, count, density (0.005 bins on [0, 1])
    OUT/similarities.parquet   one row per value: distribution (gen_train | train_train), id, score columns
    OUT/duplicates.parquet     per matched and per random training image: its near-duplicates in the index
    OUT/report.html            one file, no external assets (thumbnails inlined)

train→train: a seeded sample of the index's training images is searched as queries, shard by shard (one
index shard in memory at a time, so it runs against any index size), and the best match that is not the
image itself is kept (Somepalli's "second-nearest", robust to ANN misses and exact duplicates).

Duplicates (Somepalli: matched images are duplicated 34× vs 12× on average): for each matched training
image, the number of other training images within ``duplicate_radius`` of it, by range search on every
index shard at ``duplicate_radius − duplicate_margin`` (PQ scores are approximate) and exact re-scoring
of what it returns; the same for a random sample of training images.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from indexing.errors import CopyscanError
from indexing.read import fetch
from indexing.store import layout, storage
from indexing.store.manifest import load_manifest, resolve
from search.ann.normalise import ScoreNormaliser, whiten
from search.ann.searcher import ShardSearcher
from search.ann.topk import carry_values, merge_topk
from search.calibrate.thresholds import NAMED_THRESHOLDS
from search.report import html, stats
from search.results.matches import open_matches

logger = logging.getLogger("copyscan")

COLUMNS = ("score", "score_raw", "score_norm")


@dataclass(frozen=True)
class ReportConfig:
    """Every knob of ``copyscan report``; set with a YAML file (``--config``) and/or ``key=value``."""

    run: str  # URL of a finished scan output
    out: str = ""  # "" = RUN/report
    index: str = ""  # "" = the index the run scanned (its run.yaml)
    column: str = ""  # score column the HTML leads with; "" = the run's threshold column, else score
    thresholds: list[float] = field(default_factory=lambda: [0.5])  # fractions above, for every column
    train_sample: int = 2_000  # training images searched for the train→train distribution
    seed: int = 0
    resamples: int = 1_000  # bootstrap resamples
    duplicate_radius: float = 0.95  # near-duplicate: ``score`` (the index's space) ≥ this
    duplicate_margin: float = 0.1  # range search radius = duplicate_radius − margin, then exact re-score
    duplicate_images: int = 1_000  # matched training images counted at most (highest-scoring first)
    duplicate_random: int = 1_000  # random training images, the baseline
    gallery: int = 10_000  # best matches listed in the HTML gallery
    thumbnails: int = 2_000  # of those, how many get inlined images (the best first)
    thumb_size: int = 128  # longest side of an inlined thumbnail, pixels
    ranks: int = 1  # gallery rows per generation (1 = its best match)
    history: str = ""  # nightly history URL: adds the checkpoint trend
    memorized: str = ""  # copyscan memorized output URL: adds the flagged prompts and their cliques
    memorized_prompts: int = 50  # flagged prompts shown at most
    memorized_images: int = 16  # clique members shown per prompt (closest to the rest first)
    candidates: int = 100
    nprobe: int = 0  # 0 = the index's default
    cache_dir: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        problems = []
        if self.column and self.column not in COLUMNS:
            problems.append(f"column must be one of {', '.join(COLUMNS)}")
        for name in ("resamples", "gallery", "thumb_size", "ranks", "candidates"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("train_sample", "duplicate_images", "duplicate_random", "thumbnails"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not 0 < self.duplicate_margin < 1:
            problems.append("duplicate_margin must be in (0, 1)")
        if problems:
            raise CopyscanError("invalid report config: " + "; ".join(problems))

    @property
    def out_url(self) -> str:
        return self.out or layout.report_dir(self.run)


# ---------------------------------------------------------------------------------------------- data


def sample_ids(manifest: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """(≤ n,) packed ids of training images, uniformly at random (seeded) over the whole index."""
    entries = [e for e in manifest["embedding_shards"] if e["count"] > 0]
    counts = np.array([e["count"] for e in entries], dtype=np.int64)
    total = int(counts.sum())
    if total == 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    flat = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    which = np.searchsorted(np.cumsum(counts), flat, side="right")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards = np.array([e["shard"] for e in entries], dtype=np.int64)[which]
    return (shards << layout.ROW_BITS) | (flat - starts[which]).astype(np.int64)


def stored_vectors(index_url: str, manifest: dict[str, Any], ids: np.ndarray, so=None) -> np.ndarray:
    """(n, d) float32 raw descriptors of packed ``ids``, read from the index's embedding shards."""
    emb = {e["shard"]: e for e in manifest["embedding_shards"]}
    out = np.zeros((len(ids), int(manifest["dim"])), dtype=np.float32)
    shard, row = layout.unpack_ids(ids)
    for s in np.unique(shard):
        sel = shard == s
        vectors = storage.load_npy(resolve(index_url, emb[int(s)]["img_emb"]), so, mmap=True)
        out[sel] = np.asarray(vectors[row[sel]], dtype=np.float32)
    return out


def _searchers(cfg: ReportConfig, index_url: str, manifest: dict[str, Any]):
    """One ShardSearcher per index shard, built when needed: one shard's index in memory at a time."""
    nprobe = cfg.nprobe or int(manifest["index"].get("nprobe") or 0)
    for entry in manifest["index_shards"]:
        searcher = ShardSearcher(
            index_url, manifest, [entry["index_shard"]], cfg.cache_dir, cfg.storage_options
        )
        if nprobe:
            searcher.set_nprobe(nprobe)
        yield searcher


def train_train(
    cfg: ReportConfig, index_url: str, manifest: dict[str, Any], ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Best match other than itself for each training image ``ids``: {"id", "neighbour", columns...}."""
    xq = stored_vectors(index_url, manifest, ids, cfg.storage_options)
    parts, raw_parts = [], []
    for searcher in _searchers(cfg, index_url, manifest):
        result = searcher.search(xq, 2, max(cfg.candidates, 2))
        parts.append((result.D, result.I))
        raw_parts.append((result.I, result.D_raw))
    D, I = merge_topk(parts, 2)
    D_raw = carry_values(I, raw_parts)
    rows = np.arange(len(ids))
    other = np.where(I[:, 0] == ids, 1, 0)
    I_other, D_other = I[rows, other], D[rows, other]
    normaliser = ScoreNormaliser(index_url, manifest, 1.0, cfg.storage_options)
    norm = normaliser(xq, D_other[:, None], I_other[:, None], exclude=ids)[:, 0]
    valid = I_other >= 0
    return {
        "id": ids,
        "neighbour": I_other,
        "score": np.where(valid, D_other, np.nan).astype(np.float32),
        "score_raw": np.where(valid, D_raw[rows, other], np.nan).astype(np.float32),
        "score_norm": norm.astype(np.float32),
    }


def near_duplicates(
    cfg: ReportConfig, index_url: str, manifest: dict[str, Any], ids: np.ndarray
) -> np.ndarray:
    """(n,) int64: how many *other* training images have ``score`` ≥ duplicate_radius with each of ``ids``."""
    counts = np.zeros(len(ids), dtype=np.int64)
    if len(ids) == 0:
        return counts
    xq = stored_vectors(index_url, manifest, ids, cfg.storage_options)
    for searcher in _searchers(cfg, index_url, manifest):
        xw = whiten(searcher.whitening, xq)
        for index in searcher.indexes.values():
            lims, _, I = index.range_search(xw, float(cfg.duplicate_radius - cfg.duplicate_margin))
            if len(I) == 0:
                continue
            owner = np.repeat(np.arange(len(ids)), np.diff(lims).astype(np.int64))
            keep = I != ids[owner]
            owner, I = owner[keep], I[keep]
            exact = searcher.pair_scores(xw, owner, I)
            np.add.at(counts, owner[exact >= cfg.duplicate_radius], 1)
    return counts


def _thresholds(cfg: ReportConfig, manifest: dict[str, Any], summary: dict[str, Any]) -> dict[str, list]:
    out = {c: list(cfg.thresholds) for c in COLUMNS}
    for column, value in NAMED_THRESHOLDS.values():
        out[column].append(value)
    cal = manifest.get("calibration") or {}
    if cal.get("build_id") == manifest.get("build_id"):
        out["score_norm"].extend(v for v in cal.get("thresholds", {}).get("score_norm", {}).values() if v)
    run_threshold = summary.get("threshold") or {}
    if "column" in run_threshold:
        out[run_threshold["column"]].append(float(run_threshold["value"]))
    return {c: sorted(set(v)) for c, v in out.items()}


def _thumbnail(data: bytes | None, size: int) -> str | None:
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
    requests: list[tuple[str | None, str]], size: int, so=None
) -> dict[tuple[str | None, str], dict[str, str | None]]:
    """(source, key) → {"src": data URL or None, "reason": why not}."""
    fetched = fetch.fetch_images(requests, so)
    with ThreadPoolExecutor(max_workers=4) as pool:
        srcs = dict(zip(fetched, pool.map(lambda f: _thumbnail(f.data, size), fetched.values()), strict=True))
    out = {}
    for key, f in fetched.items():
        reason = f.reason or (None if srcs[key] else "undecodable")
        out[key] = {"src": srcs[key], "reason": reason}
    return out


# ---------------------------------------------------------------------------------------------- main


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    so = cfg.storage_options
    t0 = time.time()
    summary_url = layout.summary_url(cfg.run)
    if not storage.exists(summary_url, so):
        raise CopyscanError(
            f"{cfg.run} has no {layout.SUMMARY_NAME}: not a finished copyscan scan (run it to the end)"
        )
    summary = storage.read_json(summary_url, so)
    index_url = cfg.index or str(summary.get("index") or "")
    if not index_url:
        raise CopyscanError(
            f"{cfg.run}/{layout.SUMMARY_NAME} does not name the index it scanned; pass index=URL"
        )
    manifest = load_manifest(index_url, so)
    if summary.get("index_build_id") and summary["index_build_id"] != manifest.get("build_id"):
        raise CopyscanError(
            f"{index_url} was rebuilt after {cfg.run} was scanned (build {manifest.get('build_id')} vs "
            f"{summary['index_build_id']}): rescan, or pass index= the index the run used"
        )
    # only the ranks the report uses (rank 0; the gallery's ranks): a scan of millions keeps k rows each
    table = open_matches(cfg.run, so).to_table(filter=pc.field("rank") < max(1, cfg.ranks))
    threshold = summary.get("threshold") or {}
    column = cfg.column or threshold.get("column") or "score"

    # gen→train: each generation's best match
    top = table.filter(pc.equal(table["rank"], 0))
    gen = {c: top.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in COLUMNS}
    logger.info(
        "report: %d generations with a match; sampling %d training images", len(top), cfg.train_sample
    )
    t1 = time.time()
    ids = sample_ids(manifest, cfg.train_sample, cfg.seed)
    tt = train_train(cfg, index_url, manifest, ids)
    seconds = {"train_train": round(time.time() - t1, 2)}

    per_column = {}
    thresholds = _thresholds(cfg, manifest, summary)
    for c in COLUMNS:
        per_column[c] = {
            "thresholds": thresholds[c],
            "gen_train": stats.describe(gen[c], thresholds[c], cfg.resamples, cfg.seed),
            "train_train": stats.describe(tt[c], thresholds[c], cfg.resamples, cfg.seed + 1),
            "shift": stats.shift(gen[c], tt[c], cfg.resamples, cfg.seed + 2),
        }

    # duplicates: matched training images (the is_copy ones, else the best matches above 0.5 on `column`)
    t1 = time.time()
    matched = _matched(top, column, threshold)
    matched_ids = np.unique(matched.column("train_id").to_numpy())
    if len(matched_ids) > cfg.duplicate_images:
        order = pc.sort_indices(matched, [(column, "descending")])
        ranked = matched.take(order).column("train_id").to_numpy()
        _, first = np.unique(ranked, return_index=True)
        matched_ids = ranked[np.sort(first)][: cfg.duplicate_images]
    random_ids = sample_ids(manifest, cfg.duplicate_random, cfg.seed + 3)
    dup_matched = near_duplicates(cfg, index_url, manifest, matched_ids)
    dup_random = near_duplicates(cfg, index_url, manifest, random_ids)
    seconds["duplicates"] = round(time.time() - t1, 2)
    duplicates = {
        "radius": cfg.duplicate_radius,
        "column": "score",
        "matched_rule": _matched_rule(column, threshold),
        "matched": _dup_summary(dup_matched),
        "random": _dup_summary(dup_random),
    }

    # gallery
    t1 = time.time()
    gallery = _gallery(cfg, table, column, manifest, index_url)
    seconds["gallery"] = round(time.time() - t1, 2)
    history = _history(cfg.history, so) if cfg.history else []
    sections = [_memorized_section(cfg)] if cfg.memorized else []

    out = cfg.out_url
    result = {
        "run": cfg.run,
        "index": index_url,
        "index_build_id": manifest.get("build_id"),
        "embedder": manifest["embedder"]["name"],
        "generations": int(summary.get("queries", len(top))),
        "generations_matched": int(len(top)),
        "train_sample": int(len(ids)),
        "run_threshold": threshold,
        "column": column,
        "bin_width": stats.BIN_WIDTH,
        "columns": per_column,
        "duplicates": duplicates,
        "gallery_rows": len(gallery["rows"]),
        "gallery_thumbnails": gallery["thumbnails"],
        "gallery_missing": gallery["missing"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
    }
    _write_tables(out, gen, top, tt, matched_ids, dup_matched, random_ids, dup_random, so)
    result["seconds"]["total"] = round(time.time() - t0, 2)
    storage.write_json(storage.join(out, layout.REPORT_STATS_NAME), result, so)
    page = html.render(result, {c: (gen[c], tt[c]) for c in COLUMNS}, gallery["rows"], history, sections)
    storage.write_bytes(storage.join(out, layout.REPORT_HTML_NAME), page.encode("utf-8"), so)
    return result


def _matched(top: pa.Table, column: str, threshold: dict[str, Any]) -> pa.Table:
    if "column" in threshold:
        return top.filter(pc.fill_null(top["is_copy"], False))
    return top.filter(pc.greater_equal(top[column], 0.5))


def _matched_rule(column: str, threshold: dict[str, Any]) -> str:
    if "column" in threshold:
        return f"is_copy: {threshold['column']} >= {threshold['value']:.4f} ({threshold.get('name')})"
    return f"{column} >= 0.5 (the run has no threshold)"


def _dup_summary(counts: np.ndarray) -> dict[str, Any]:
    if len(counts) == 0:
        return {"images": 0, "mean": None, "median": None, "max": None, "with_duplicates": None}
    return {
        "images": int(len(counts)),
        "mean": float(counts.mean()),
        "median": float(np.median(counts)),
        "max": int(counts.max()),
        "with_duplicates": float((counts > 0).mean()),
    }


def _gallery(
    cfg: ReportConfig, table: pa.Table, column: str, manifest: dict[str, Any], index_url: str
) -> dict[str, Any]:
    rows_table = table.filter(pc.less(table["rank"], cfg.ranks))
    order = pc.sort_indices(rows_table, [(column, "descending"), ("query_id", "ascending")])
    rows_table = rows_table.take(order[: cfg.gallery])
    names = [n for n in ("query_box", "train_box") if n in rows_table.column_names]
    keep = [
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
        *names,
    ]
    rows = rows_table.select([c for c in keep if c in rows_table.column_names]).to_pylist()
    sources = {}
    requests: list[tuple[str | None, str]] = []
    for i, row in enumerate(rows):
        shard = int(row["embedding_shard"])
        if shard not in sources:
            sources[shard] = fetch.training_source(manifest, index_url, shard)
        row["train_source"] = sources[shard]
        if i < cfg.thumbnails:
            requests += [(row["query_source"], row["query_id"]), (sources[shard], row["train_key"])]
    thumbs = thumbnails(requests, cfg.thumb_size, cfg.storage_options) if requests else {}
    missing: dict[str, int] = {}
    for i, row in enumerate(rows):
        for side, source, key in (
            ("query", row["query_source"], row["query_id"]),
            ("train", row["train_source"], row["train_key"]),
        ):
            thumb = thumbs.get((source, key)) if i < cfg.thumbnails else None
            row[f"{side}_thumb"] = thumb["src"] if thumb else None
            if thumb and thumb["reason"]:
                missing[thumb["reason"]] = missing.get(thumb["reason"], 0) + 1
    return {"rows": rows, "thumbnails": min(len(rows), cfg.thumbnails), "missing": missing}


def _memorized_section(cfg: ReportConfig) -> str:
    from search.memorized.discover import memorized_for_report

    prompts = memorized_for_report(cfg.memorized, cfg.storage_options, cfg.memorized_prompts)
    requests = [(m["source"], m["key"]) for p in prompts for m in p["members"][: cfg.memorized_images]]
    thumbs = thumbnails(requests, cfg.thumb_size, cfg.storage_options) if requests else {}
    return html.memorized_section(cfg.memorized, prompts, thumbs, cfg.memorized_images)


def _history(url: str, so) -> list[dict[str, Any]]:
    from search.report.history import read_history

    return [
        {
            k: r[k]
            for k in ("checkpoint", "finished_at", "queries", "flagged", "rate", "rate_low", "rate_high")
        }
        for r in read_history(url, so)
    ]


def _write_tables(out, gen, top, tt, matched_ids, dup_matched, random_ids, dup_random, so) -> None:
    rows = []
    for c in COLUMNS:
        for name, values in (("gen_train", gen[c]), ("train_train", tt[c])):
            h = stats.histogram(values)
            n = len(h["counts"])
            rows.append(
                pa.table(
                    {
                        "column": pa.array([c] * n),
                        "distribution": pa.array([name] * n),
                        "bin_lo": h["edges"][:-1],
                        "bin_hi": h["edges"][1:],
                        "count": h["counts"],
                        "density": h["density"],
                    }
                )
            )
    storage.write_parquet(storage.join(out, layout.REPORT_HISTOGRAMS_NAME), pa.concat_tables(rows), so)
    sims = pa.concat_tables(
        [
            pa.table(
                {
                    "distribution": pa.array(["gen_train"] * len(top)),
                    "id": top.column("query_id").cast(pa.string()),
                    "neighbour": top.column("train_id"),
                    **{c: pa.array(gen[c], pa.float32()) for c in COLUMNS},
                }
            ),
            pa.table(
                {
                    "distribution": pa.array(["train_train"] * len(tt["id"])),
                    "id": pa.array([str(i) for i in tt["id"]], pa.string()),
                    "neighbour": pa.array(tt["neighbour"], pa.int64()),
                    **{c: pa.array(tt[c], pa.float32()) for c in COLUMNS},
                }
            ),
        ]
    )
    storage.write_parquet(storage.join(out, layout.REPORT_SIMILARITIES_NAME), sims, so)
    dups = pa.table(
        {
            "group": pa.array(["matched"] * len(matched_ids) + ["random"] * len(random_ids)),
            "train_id": pa.array(np.concatenate([matched_ids, random_ids]).astype(np.int64)),
            "duplicates": pa.array(np.concatenate([dup_matched, dup_random]).astype(np.int64)),
        }
    )
    storage.write_parquet(storage.join(out, layout.REPORT_DUPLICATES_NAME), dups, so)
