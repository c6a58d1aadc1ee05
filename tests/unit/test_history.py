"""Replication-rate statistics and the nightly comparison, by hand."""

import math

import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.search.report.history import compare, regression_report, rise_p_value, wilson_interval


def test_wilson_interval_matches_the_formula_and_stays_in_0_1():
    low, high = wilson_interval(19, 1000)  # Somepalli: 1.9 %
    assert low == pytest.approx(0.01219, abs=1e-4) and high == pytest.approx(0.02949, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)  # 0 of 10 still allows 28 %
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_rise_p_value_is_a_one_sided_two_proportion_test():
    # 30/1000 vs 15/1000: pooled 0.0225, se = sqrt(.0225·.9775·2/1000), z = 0.015/se
    se = math.sqrt(0.0225 * 0.9775 * 2 / 1000)
    assert rise_p_value(30, 1000, 15, 1000) == pytest.approx(0.5 * math.erfc(0.015 / se / math.sqrt(2)))
    assert rise_p_value(30, 1000, 15, 1000) < 0.05 < rise_p_value(15, 1000, 30, 1000)
    assert rise_p_value(0, 10, 0, 10) == 1.0


def _row(name, k, n, when, threshold="score_norm>=0.1100 (p90)", build="b", keys=(), prompts=None):
    return {
        "checkpoint": name,
        "finished_at": when,
        "threshold": threshold,
        "index_build_id": build,
        "flagged": k,
        "queries": n,
        "rate": k / n,
        "rate_low": wilson_interval(k, n)[0],
        "rate_high": wilson_interval(k, n)[1],
        "matched_train_keys": list(keys),
        **({} if prompts is None else {"flagged_prompts": list(prompts)}),
    }


def test_regression_against_previous_and_baseline():
    base = _row("v1", 10, 1000, "2026-01-01T00:00:00Z", keys=["a"])
    prev = _row("v2", 25, 1000, "2026-01-02T00:00:00Z", keys=["a", "b"], prompts=["a cat"])
    now = _row("v3", 28, 1000, "2026-01-03T00:00:00Z", keys=["b", "c"], prompts=["a cat", "the mona lisa"])
    report = regression_report(now, [base, prev, now], baseline="v1", alpha=0.01)
    assert report["vs_previous"]["checkpoint"] == "v2" and not report["vs_previous"]["rose_significantly"]
    assert report["vs_baseline"]["checkpoint"] == "v1" and report["vs_baseline"]["rose_significantly"]
    assert report["regression"] and report["vs_previous"]["newly_matched_train_keys"] == ["c"]
    assert report["vs_previous"]["newly_flagged_prompts"] == ["the mona lisa"]
    # a history row written before prompts were recorded (v1) compares as having none
    assert report["vs_baseline"]["newly_flagged_prompts"] == ["a cat", "the mona lisa"]
    assert [t["checkpoint"] for t in report["trend"]] == ["v1", "v2", "v3"]
    # another threshold: reported, never gating
    other = _row("v4", 90, 1000, "2026-01-04T00:00:00Z", threshold="score_raw>=0.5000 (somepalli)")
    result = compare(other, now, 0.01)
    assert not result["comparable"] and not result["rose_significantly"] and result["why_not"]
    with pytest.raises(CopyscanError, match="baseline"):
        regression_report(now, [prev, now], baseline="v0", alpha=0.01)
    first = regression_report(base, [base], baseline=None, alpha=0.01)
    assert first["vs_previous"] is None and not first["regression"]


def test_history_row_reads_a_verified_scans_answer_at_verify_rank_0(tmp_path):
    """In a scan that verified whole copies (verify_whole) the flagged answer can be another row than
    rank 0: the history's matched training images are those of the threshold's answer rank."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from copyscan.indexing.store import layout
    from copyscan.search.report.history import history_row

    matches = tmp_path / "scan"
    (matches / "matches").mkdir(parents=True)
    assert layout.matches_dir(str(matches)) == str(matches / "matches")
    table = pa.table(
        {  # generation g0: rank 1 verified best and flagged; g1: nothing flagged
            "query_id": ["g0", "g0", "g1", "g1"],
            "rank": pa.array([0, 1, 0, 1], pa.int32()),
            "verify_rank": pa.array([1, 0, 0, None], pa.int32()),
            "is_copy": [False, True, False, False],
            "train_key": ["a", "b", "c", "d"],
            "prompt": ["p0", "p0", "p1", "p1"],
        }
    )
    pq.write_table(table, matches / "matches" / "part-00000.parquet")
    summary = {"embedded": 2, "flagged": 1, "finished_at": "2026-12-06T00:00:00Z", "index": "idx"}
    verified = {"column": "verify_score", "value": 0.3, "name": "p90", "rank": "verify_rank"}
    row = history_row("ckpt", "gens", str(matches), {**summary, "threshold": verified})
    assert row["matched_train_keys"] == ["b"] and row["flagged_prompts"] == ["p0"]
    plain = {"column": "score_norm", "value": 0.1, "name": "p90"}  # unverified: rank 0 is the answer
    assert (
        history_row("ckpt", "gens", str(matches), {**summary, "threshold": plain})["matched_train_keys"] == []
    )
