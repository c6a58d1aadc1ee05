"""SQL over scan results (DuckDB) and results.open, on scan outputs laid out as a scan writes them."""

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.jobs import query as query_job
from copyscan.search import results
from copyscan.search.results.matches import MATCHES_SCHEMA
from copyscan.search.results.sql import run_query


def _run(root, name, rows, flagged):
    out = root / name
    (out / "matches").mkdir(parents=True)
    full = [
        {field.name: None for field in MATCHES_SCHEMA} | {"score_norm": 0.0, "score_raw": 0.0} | r
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(full, MATCHES_SCHEMA), out / "matches" / "part-00000.parquet")
    summary = {
        "index": "s3://b/idx",
        "queries": 3,
        "embedded": 3,
        "flagged": flagged,
        "threshold": {"name": "p90", "column": "score_norm", "value": 0.11},
        "finished_at": "2026-11-28T00:00:00Z",
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return str(out)


@pytest.fixture
def two_runs(tmp_path):
    a = _run(
        tmp_path,
        "ckpt-a",
        [
            {"query_id": "q1", "rank": 0, "train_key": "t1", "score": 0.9, "is_copy": True},
            {"query_id": "q1", "rank": 1, "train_key": "t2", "score": 0.2, "is_copy": False},
            {"query_id": "q2", "rank": 0, "train_key": "t2", "score": 0.1, "is_copy": False},
        ],
        flagged=1,
    )
    b = _run(
        tmp_path,
        "ckpt-b",
        [
            {"query_id": "q1", "rank": 0, "train_key": "t1", "score": 0.8, "is_copy": True},
            {"query_id": "q3", "rank": 0, "train_key": "t1", "score": 0.7, "is_copy": True},
        ],
        flagged=2,
    )
    return a, b


def test_sql_across_runs(two_runs):
    a, b = two_runs
    top = run_query(
        [a, b],
        "SELECT train_key, count(DISTINCT run) AS runs, count(*) AS generations FROM matches "
        "WHERE rank = 0 AND is_copy GROUP BY train_key ORDER BY generations DESC",
    )
    assert top.to_pylist() == [{"train_key": "t1", "runs": 2, "generations": 3}]
    rates = run_query(
        [a, b], "SELECT run, flagged::DOUBLE / embedded AS rate, threshold FROM runs ORDER BY run"
    )
    assert [r["rate"] for r in rates.to_pylist()] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert rates.column("threshold").to_pylist()[0] == "score_norm>=0.1100 (p90)"
    with pytest.raises(CopyscanError, match="query failed"):
        run_query([a], "SELECT nope FROM matches")
    with pytest.raises(CopyscanError, match="not a finished copyscan scan"):
        run_query([a + "-missing"], "SELECT 1")


def test_results_open_as_arrow_and_duckdb(two_runs):
    a, _ = two_runs
    dataset = results.open(a)
    assert dataset.count_rows() == 3 and dataset.schema.equals(MATCHES_SCHEMA)
    relation = results.open(a, engine="duckdb")
    assert relation.filter("is_copy").aggregate("count(*)").fetchall() == [(1,)]


def test_cli_prints_and_writes(two_runs, tmp_path, capsys):
    a, b = two_runs
    sql = "SELECT run, query_id, score FROM matches WHERE rank = 0 ORDER BY score DESC"
    assert query_job.JOB.main([a, b, sql, "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "0.9000" in printed and "2 more row(s)" in printed  # 4 best matches, 2 shown
    out = tmp_path / "top.csv"
    assert query_job.JOB.main([a, b, sql, "--out", str(out)]) == 0
    assert pcsv.read_csv(out).num_rows == 4
    assert query_job.JOB.main([a]) == 2  # no SQL


def test_sql_filters_on_provenance_and_reads_older_runs(tmp_path):
    """Matches carry the training image's source metadata; a run written before those columns (its files
    lack them) reads them as null, so one query spans both."""
    new = _run(
        tmp_path,
        "new",
        [
            {
                "query_id": "q1",
                "rank": 0,
                "train_key": "t1",
                "score": 0.9,
                "license": "cc-by",
                "pwatermark": 0.95,
            },
            {
                "query_id": "q2",
                "rank": 0,
                "train_key": "t2",
                "score": 0.8,
                "license": "?",
                "pwatermark": 0.99,
            },
            {
                "query_id": "q3",
                "rank": 0,
                "train_key": "t3",
                "score": 0.7,
                "license": "cc-by",
                "pwatermark": 0.1,
            },
        ],
        flagged=3,
    )
    old = _run(tmp_path, "old", [{"query_id": "q1", "rank": 0, "train_key": "t1", "score": 0.9}], flagged=1)
    files = tmp_path / "old" / "matches" / "part-00000.parquet"
    table = pq.read_table(files)
    pq.write_table(table.drop(["sha256", "license", "pwatermark", "punsafe", "clip_similarity"]), files)
    found = run_query(
        [new, old],
        "SELECT train_key FROM matches WHERE pwatermark > 0.8 AND license <> '?' ORDER BY train_key",
    )
    assert found.to_pylist() == [{"train_key": "t1"}]
    nulls = run_query([new, old], "SELECT run, count(*) AS n FROM matches WHERE license IS NULL GROUP BY run")
    assert [r["n"] for r in nulls.to_pylist()] == [1] and nulls.to_pylist()[0]["run"].endswith("old")
