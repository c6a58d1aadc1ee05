"""``copyscan nightly`` / ``python -m copyscan.jobs.nightly``: scan one checkpoint's generations and gate on
the trend.

Scans the generations (made elsewhere: copyscan does not run the diffusion model) into
``HISTORY/runs/CHECKPOINT``, appends the checkpoint's row to ``HISTORY/history/``, compares its replication
rate with the previous checkpoint and the pinned ``--baseline``, and writes
``HISTORY/regression/CHECKPOINT.json`` (see ``search/report/history.py``) and the checkpoint's report with the trend
across checkpoints, ``HISTORY/reports/CHECKPOINT/report.html`` (``copyscan report``). Exit status: 0 when the rate did not rise
significantly, 3 when it did, 2 on errors. Rerunning a night resumes its scan.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from copyscan.jobs._runtime import Job, layers

REGRESSION_EXIT = 3


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="name of the model checkpoint (e.g. sd-v1-4-ema)")
    parser.add_argument(
        "--generations", required=True, help="its generated images: folder or webdataset shards"
    )
    parser.add_argument("--index", required=True, help="URL of the training set's copyscan index")
    parser.add_argument("--history", required=True, help="URL of the history (runs, history rows, reports)")
    parser.add_argument("--baseline", help="pinned checkpoint to compare with as well as the previous one")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance of a rise (default 0.01)")
    parser.add_argument(
        "--no-report", action="store_true", help="skip HISTORY/reports/CHECKPOINT (the HTML report)"
    )


def _body(args: argparse.Namespace) -> int:
    """Scan, gate, report; REGRESSION_EXIT when the replication rate rose significantly, else 0."""
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store import layout
    from copyscan.search.scan_config import ScanConfig

    scan_out = layout.history_run_dir(args.history, args.checkpoint)
    explicit = {"index": args.index, "queries": args.generations, "out": scan_out}
    cfg = resolve(ScanConfig, *layers(args, explicit))
    regression = _scan_and_compare(args, cfg, scan_out)
    print(json.dumps(regression, indent=2))
    if not args.no_report:
        _write_report(args, cfg, scan_out)
    if regression["regression"]:
        print(
            f"copyscan: the replication rate of {args.checkpoint} rose significantly (exit {REGRESSION_EXIT})",
            file=sys.stderr,
        )
        return REGRESSION_EXIT
    return 0


def _scan_and_compare(args: argparse.Namespace, cfg: Any, scan_out: str) -> dict[str, Any]:
    """Scan the checkpoint's generations, append its history row and write its regression report."""
    from copyscan.indexing.store import layout, storage
    from copyscan.search.report import history
    from copyscan.search.scan_ray import run_scan

    so = cfg.storage_options
    summary = run_scan(cfg)
    row = history.history_row(args.checkpoint, args.generations, scan_out, summary, so)
    history.write_row(args.history, row, so)
    report = history.regression_report(row, history.read_history(args.history, so), args.baseline, args.alpha)
    storage.write_json(layout.regression_url(args.history, args.checkpoint), report, so)
    return report


def _write_report(args: argparse.Namespace, cfg: Any, scan_out: str) -> None:
    """The checkpoint's HTML report with the trend across checkpoints (``copyscan report``)."""
    from copyscan.indexing.store import layout
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.report.run import run_report

    report_out = layout.history_report_dir(args.history, args.checkpoint)
    run_report(
        ReportConfig(
            run=scan_out,
            out=report_out,
            history=args.history,
            cache_dir=cfg.cache_dir,
            storage_options=dict(cfg.storage_options),
        )
    )
    print(f"report: {report_out}/report.html")


JOB = Job(
    name="nightly",
    summary="scan a checkpoint's generations, append to the history, exit 3 on a significant rise",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.scan_config:ScanConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
