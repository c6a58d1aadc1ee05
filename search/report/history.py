"""Nightly scans: one history row per checkpoint, compared with the previous run and a pinned baseline.

Layout under the history URL ``H``::

    H/runs/{checkpoint}/                 the checkpoint's scan (matches/, summary.json, run.yaml)
    H/history/{checkpoint}.parquet       its history row (HISTORY_SCHEMA), written after the scan
    H/regression/{checkpoint}.json       the comparison (also printed)

The replication rate is the share of a checkpoint's generations whose best match passes the scan's
threshold (``is_copy`` at rank 0), with a Wilson 95 % interval. A rise is significant when a one-sided
two-proportion z-test gives p < ``alpha`` (0.01 by default) against the previous checkpoint or the baseline;
runs with different thresholds or index builds are reported as not comparable and never gate.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.search.report.stats import wilson_interval

HISTORY_SCHEMA = pa.schema(
    [
        ("checkpoint", pa.string()),
        ("finished_at", pa.string()),  # ISO 8601 UTC
        ("generations", pa.string()),
        ("index", pa.string()),
        ("index_build_id", pa.string()),
        ("threshold", pa.string()),  # e.g. "score_norm>=0.1112 (p90)"
        ("queries", pa.int64()),  # generations embedded
        ("flagged", pa.int64()),  # generations whose best match passes the threshold
        ("rate", pa.float64()),
        ("rate_low", pa.float64()),  # Wilson 95 % interval
        ("rate_high", pa.float64()),
        ("matched_train_keys", pa.list_(pa.string())),  # training images matched by a flagged generation
        # prompts with a flagged generation (generations from webdataset shards with a prompt/caption)
        ("flagged_prompts", pa.list_(pa.string())),
    ]
)


def rise_p_value(k_new: int, n_new: int, k_old: int, n_old: int) -> float:
    """One-sided p-value of "the new rate is higher" (two-proportion z-test, pooled variance)."""
    if n_new == 0 or n_old == 0:
        return 1.0
    pooled = (k_new + k_old) / (n_new + n_old)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_new + 1 / n_old))
    diff = k_new / n_new - k_old / n_old
    if se == 0:
        return 1.0 if diff <= 0 else 0.0
    return 0.5 * math.erfc(diff / se / math.sqrt(2))


def history_row(checkpoint: str, generations: str, scan_out: str, summary: dict[str, Any], so=None) -> dict:
    """The history row of a finished scan."""
    threshold = summary.get("threshold") or {}
    if "column" not in threshold:
        raise CopyscanError(
            "the scan has no threshold, so no replication rate: calibrate the index (copyscan calibrate) or "
            "pass threshold=somepalli / duplicate / a score_norm value"
        )
    fs, path = storage.get_fs(layout.matches_dir(scan_out), so)
    answer = threshold.get("rank", "rank")  # the generation's answer: verify_rank 0 in a verified scan
    columns = [answer, "is_copy", "train_key", "prompt"]
    present = set(pq.ParquetDataset(path, filesystem=fs).schema.names)  # runs older than `prompt` lack it
    table = pq.read_table(path, filesystem=fs, columns=[c for c in columns if c in present])
    top = table.filter(pc.and_(pc.equal(table[answer], 0), table["is_copy"]))
    n, k = int(summary["embedded"]), int(summary["flagged"])
    low, high = wilson_interval(k, n)
    return {
        "checkpoint": checkpoint,
        "finished_at": summary["finished_at"],
        "generations": generations,
        "index": summary["index"],
        "index_build_id": summary.get("index_build_id", ""),
        "threshold": f"{threshold['column']}>={threshold['value']:.4f} ({threshold['name']})",
        "queries": n,
        "flagged": k,
        "rate": k / n if n else 0.0,
        "rate_low": low,
        "rate_high": high,
        "matched_train_keys": sorted(set(top.column("train_key").to_pylist())),
        "flagged_prompts": sorted(
            {p for p in (top.column("prompt").to_pylist() if "prompt" in top.column_names else []) if p}
        ),
    }


def write_row(history: str, row: dict[str, Any], so=None) -> None:
    storage.write_parquet(
        layout.history_url(history, row["checkpoint"]), pa.Table.from_pylist([row], HISTORY_SCHEMA), so
    )


def read_history(history: str, so=None) -> list[dict[str, Any]]:
    """Every history row, oldest first."""
    rows = []
    for url in storage.list_files(layout.history_dir(history), so):
        if url.endswith(".parquet"):
            rows.extend(pq.read_table(io.BytesIO(storage.read_bytes(url, so))).to_pylist())
    return sorted(rows, key=lambda r: (r["finished_at"], r["checkpoint"]))


TREND_KEYS = ("checkpoint", "finished_at", "queries", "flagged", "rate", "rate_low", "rate_high")


def trend(history: str, so=None) -> list[dict[str, Any]]:
    """The report's trend across checkpoints: ``TREND_KEYS`` of every history row, oldest first."""
    return [{k: r[k] for k in TREND_KEYS} for r in read_history(history, so)]


def compare(row: dict[str, Any], other: dict[str, Any] | None, alpha: float) -> dict[str, Any] | None:
    """``row`` against an earlier run: rates, p-value of a rise, training images newly matched."""
    if other is None:
        return None
    comparable = row["threshold"] == other["threshold"] and row["index_build_id"] == other["index_build_id"]
    p = rise_p_value(row["flagged"], row["queries"], other["flagged"], other["queries"])
    return {
        "checkpoint": other["checkpoint"],
        "rate": other["rate"],
        "rate_interval": [other["rate_low"], other["rate_high"]],
        "comparable": comparable,
        "why_not": None
        if comparable
        else "different threshold or index build: rates are not on the same scale",
        "p_value_rise": p,
        "rose_significantly": comparable and p < alpha,
        "newly_matched_train_keys": sorted(set(row["matched_train_keys"]) - set(other["matched_train_keys"])),
        # prompts whose generations copy now and did not before (older history rows have none recorded)
        "newly_flagged_prompts": sorted(
            set(row.get("flagged_prompts") or []) - set(other.get("flagged_prompts") or [])
        ),
    }


def regression_report(
    row: dict[str, Any], history: list[dict[str, Any]], baseline: str | None, alpha: float
) -> dict[str, Any]:
    earlier = [
        r for r in history if r["checkpoint"] != row["checkpoint"] and r["finished_at"] <= row["finished_at"]
    ]
    previous = earlier[-1] if earlier else None
    pinned = None
    if baseline:
        found = [r for r in history if r["checkpoint"] == baseline]
        if not found:
            raise CopyscanError(f"baseline checkpoint {baseline!r} has no history row; scan it first")
        pinned = found[-1]
    vs_previous = compare(row, previous, alpha)
    vs_baseline = compare(row, pinned, alpha) if pinned is not None and pinned is not previous else None
    if pinned is not None and pinned is previous:
        vs_baseline = vs_previous
    regressed = any(c is not None and c["rose_significantly"] for c in (vs_previous, vs_baseline))
    return {
        "checkpoint": row["checkpoint"],
        "rate": row["rate"],
        "rate_interval": [row["rate_low"], row["rate_high"]],
        "flagged": row["flagged"],
        "queries": row["queries"],
        "threshold": row["threshold"],
        "alpha": alpha,
        "vs_previous": vs_previous,
        "vs_baseline": vs_baseline,
        "regression": regressed,
        "trend": [
            {
                "checkpoint": r["checkpoint"],
                "rate": r["rate"],
                "rate_interval": [r["rate_low"], r["rate_high"]],
            }
            for r in history
        ],
    }
