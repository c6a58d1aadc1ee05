"""``copyscan report RUN``: replication statistics, duplicate counts and a self-contained HTML report.

Outputs (``OUT`` defaults to ``RUN/report``)::

    OUT/stats.json             both distributions per score column: mean, std, p75/90/95, values outside
                               [0, 1], fraction ≥ each threshold with Wilson 95 % intervals; mean shift
                               with a bootstrap interval; duplicates summary
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

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import load_manifest
from copyscan.search.calibrate.thresholds import NAMED_THRESHOLDS
from copyscan.search.report import html, stats
from copyscan.search.report.config import COLUMNS, ReportConfig
from copyscan.search.report.duplicates import Duplicates, count_duplicates
from copyscan.search.report.gallery import gallery, memorized_section, scores_section
from copyscan.search.report.history import trend
from copyscan.search.report.neighbours import sample_ids, train_train
from copyscan.search.report.tables import write_tables
from copyscan.search.results.dataset import open_matches

logger = logging.getLogger("copyscan")


@dataclass(frozen=True)
class ScanRun:
    """A finished scan as the report reads it, with the index it scanned."""

    url: str
    summary: dict[str, Any]  # its summary.json
    index_url: str
    manifest: dict[str, Any]  # the index's manifest (the same build the run scanned)
    table: pa.Table  # its matches of the ranks the report uses (< max(1, cfg.ranks))
    top: pa.Table  # the rank-0 rows: each generation's best match

    @property
    def threshold(self) -> dict[str, Any]:
        """The run's is_copy threshold ({"column", "value", "name"}), {} when it had none."""
        return self.summary.get("threshold") or {}


def load_run(cfg: ReportConfig) -> ScanRun:
    """Reads ``cfg.run``'s summary, the manifest of its index and its matches; CopyscanError when the run
    is unfinished, names no index, or the index was rebuilt since."""
    so = cfg.storage_options
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
    top = table.filter(pc.equal(table["rank"], 0))
    return ScanRun(cfg.run, summary, index_url, manifest, table, top)


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    """Writes the report of ``cfg.run`` into ``cfg.out_url`` (the files the module docstring lists);
    returns stats.json's content."""
    so = cfg.storage_options
    t0 = time.time()
    run = load_run(cfg)
    column = cfg.column or run.threshold.get("column") or "score"
    # gen→train: each generation's best match
    gen = {c: run.top.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in COLUMNS}
    logger.info(
        "report: %d generations with a match; sampling %d training images", len(run.top), cfg.train_sample
    )
    t1 = time.time()
    ids = sample_ids(run.manifest, cfg.train_sample, cfg.seed)
    tt = train_train(cfg, run.index_url, run.manifest, ids)
    seconds = {"train_train": round(time.time() - t1, 2)}
    per_column = statistics(cfg, gen, tt, report_thresholds(cfg, run.manifest, run.summary))
    t1 = time.time()
    duplicates = count_duplicates(cfg, run.index_url, run.manifest, run.top, column, run.threshold)
    seconds["duplicates"] = round(time.time() - t1, 2)
    t1 = time.time()
    shown = gallery(cfg, run.table, column, run.manifest, run.index_url)
    seconds["gallery"] = round(time.time() - t1, 2)
    history = trend(cfg.history, so) if cfg.history else []
    sections = [memorized_section(cfg)] if cfg.memorized else []
    if cfg.generations:
        sections.append(scores_section(cfg, run.table))

    result = _result(run, column, len(ids), per_column, duplicates, shown, seconds)
    out = cfg.out_url
    write_tables(out, gen, run.top, tt, duplicates, so)
    result["seconds"]["total"] = round(time.time() - t0, 2)
    storage.write_json(storage.join(out, layout.REPORT_STATS_NAME), result, so)
    page = html.render(result, {c: (gen[c], tt[c]) for c in COLUMNS}, shown["rows"], history, sections)
    storage.write_bytes(storage.join(out, layout.REPORT_HTML_NAME), page.encode("utf-8"), so)
    return result


def report_thresholds(
    cfg: ReportConfig, manifest: dict[str, Any], summary: dict[str, Any]
) -> dict[str, list]:
    """column → the sorted thresholds whose fractions above are reported: the configured ones, the
    named ones, the index's calibrated score_norm thresholds (same build) and the run's own."""
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


def statistics(
    cfg: ReportConfig,
    gen: dict[str, np.ndarray],
    tt: dict[str, np.ndarray],
    thresholds: dict[str, list],
) -> dict[str, dict[str, Any]]:
    """column → {"thresholds", "gen_train", "train_train" (``stats.describe``), "shift" (``stats.shift``)}
    of the generations' top-1 values ``gen`` against the training sample's ``tt``."""
    return {
        c: {
            "thresholds": thresholds[c],
            "gen_train": stats.describe(gen[c], thresholds[c]),
            "train_train": stats.describe(tt[c], thresholds[c]),
            "shift": stats.shift(gen[c], tt[c], cfg.resamples, cfg.seed + 2),
        }
        for c in COLUMNS
    }


def _result(
    run: ScanRun,
    column: str,
    train_sample: int,
    per_column: dict[str, Any],
    duplicates: Duplicates,
    shown: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """stats.json's content (its seconds["total"] added when the tables are written)."""
    return {
        "run": run.url,
        "index": run.index_url,
        "index_build_id": run.manifest.get("build_id"),
        "embedder": run.manifest["embedder"]["name"],
        "generations": int(run.summary.get("queries", len(run.top))),
        "generations_matched": int(len(run.top)),
        "train_sample": int(train_sample),
        "run_threshold": run.threshold,
        "column": column,
        "bin_width": stats.BIN_WIDTH,
        "columns": per_column,
        "duplicates": duplicates.summary,
        "gallery_rows": len(shown["rows"]),
        "gallery_thumbnails": shown["thumbnails"],
        "gallery_missing": shown["missing"],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": seconds,
    }
