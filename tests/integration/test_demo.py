"""``copyscan demo`` end to end, smaller than ``make demo``: img2dataset, index, calibrate, scan, report."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from copyscan.jobs.demo import run_demo


def test_demo_ends_in_a_calibrated_scan_and_its_report(ray_session, tmp_path, open_page):
    out = tmp_path / "demo"
    printed = run_demo(out, n_train=60, n_copies=6, n_unrelated=6, seed=0, fresh=False)
    result = json.loads((out / "demo_result.json").read_text())
    assert result["planted"] == 6 and result["found_at_rank0"] >= 5
    assert result["unrelated"] == 6 and 0 <= result["unrelated_flagged"] <= 6
    assert result["copies_flagged_on_source"] <= result["copies_flagged"] <= 6
    # the scan flagged with the threshold calibrate stored on the index, and says so
    summary = json.loads((out / "scan" / "summary.json").read_text())
    assert summary["threshold"]["name"] == "p90" and "copyscan calibrate" in summary["threshold"]["source"]
    top = pq.read_table(out / "scan" / "matches", filters=[("rank", "=", 0)]).to_pylist()
    assert (
        sum(r["is_copy"] for r in top)
        == summary["flagged"]
        == result["copies_flagged"] + result["unrelated_flagged"]
    )
    flagged_line = next(line for line in printed.splitlines() if line.startswith("flagged as copies"))
    assert flagged_line == (
        f"flagged as copies (is_copy): {result['copies_flagged']}/6 planted copies "
        f"({result['copies_flagged_on_source']} on their source), {result['unrelated_flagged']}/6 unrelated images"
    )
    report = out / "scan" / "report" / "report.html"
    assert f"report (open it):      {report}" in printed
    loaded = open_page(str(report))
    assert loaded.console_errors == []
    assert loaded.page.locator("#gallery-body tr").count() == 12  # one row per generated image
