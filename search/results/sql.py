"""SQL over scan results with DuckDB: ``copyscan query RUN [RUN ...] "SQL"``.

Views available to the SQL:

- ``matches``: every match of every run given (``MATCHES_SCHEMA`` in search/results/matches.py), plus ``run``
  (the run's URL as given); read lazily from the runs' parquet parts (local or object storage);
- ``runs``: one row per run from its ``summary.json``: ``run``, ``index``, ``queries``, ``embedded``,
  ``flagged``, ``threshold`` (e.g. "score_norm>=0.1112 (p90)"), ``finished_at``.

Example: the training images copied most often across runs::

    SELECT train_key, any_value(train_url) AS url, count(DISTINCT run) AS runs, count(*) AS generations
    FROM matches WHERE coalesce(verify_rank, rank) = 0 AND is_copy
    GROUP BY train_key ORDER BY generations DESC LIMIT 20

(A generation's answer is its row of ``rank = 0``, or in a scan that verified whole copies, ``verify_whole``, its
row of ``verify_rank = 0``, the row the run's ``flagged`` counts: ``coalesce(verify_rank, rank) = 0`` reads both,
and runs from before the verification columns.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.search.results.dataset import open_matches

RUNS_SCHEMA = pa.schema(
    [
        ("run", pa.string()),
        ("index", pa.string()),
        ("queries", pa.int64()),
        ("embedded", pa.int64()),
        ("flagged", pa.int64()),
        ("threshold", pa.string()),
        ("finished_at", pa.string()),
    ]
)


def _threshold_text(summary: dict[str, Any]) -> str | None:
    t = summary.get("threshold") or {}
    return f"{t['column']}>={t['value']:.4f} ({t['name']})" if "column" in t else None


def connect(runs: Sequence[str], storage_options: storage.StorageOptions | None = None) -> Any:
    """A DuckDB connection with the ``matches`` and ``runs`` views over ``runs`` (scan output URLs)."""
    import duckdb

    if not runs:
        raise CopyscanError("give at least one scan output")
    con = duckdb.connect()
    rows = []
    parts = []
    for i, run in enumerate(runs):
        summary_url = layout.summary_url(run)
        if not storage.exists(summary_url, storage_options):
            raise CopyscanError(f"{run} is not a finished copyscan scan (no {layout.SUMMARY_NAME})")
        summary = storage.read_json(summary_url, storage_options)
        rows.append(
            {
                "run": run,
                "index": summary.get("index"),
                "queries": summary.get("queries"),
                "embedded": summary.get("embedded"),
                "flagged": summary.get("flagged"),
                "threshold": _threshold_text(summary),
                "finished_at": summary.get("finished_at"),
            }
        )
        con.register(f"_matches_{i}", open_matches(run, storage_options))
        parts.append(f"SELECT {_literal(run)} AS run, * FROM _matches_{i}")
    con.execute("CREATE VIEW matches AS " + " UNION ALL ".join(parts))
    con.register("_runs", pa.Table.from_pylist(rows, RUNS_SCHEMA))
    con.execute("CREATE VIEW runs AS SELECT * FROM _runs")
    return con


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_query(
    runs: Sequence[str], sql: str, storage_options: storage.StorageOptions | None = None
) -> pa.Table:
    """The result of ``sql`` over the ``matches`` and ``runs`` views of ``runs``, as an Arrow table."""
    import duckdb

    con = connect(runs, storage_options)
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise CopyscanError(f"query failed: {exc}") from None
