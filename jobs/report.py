"""``copyscan report RUN`` / ``python -m copyscan.jobs.report RUN``: statistics, duplicates and an HTML
report.

Reads a finished scan (matches/ and summary.json) and the index it scanned; writes ``RUN/report/``
(or ``out=URL``): ``stats.json``, ``histograms.parquet``, ``similarities.parquet``, ``duplicates.parquet``
and ``report.html`` (self-contained: open it in any browser, mail it, attach it to a ticket). Runs in
this process, one index shard in memory at a time.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from copyscan.jobs._runtime import Job, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="URL of a finished scan output")
    parser.add_argument("--history", help="nightly history URL: adds the trend across checkpoints")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.report.run import run_report

    given = {"run": args.run}
    if args.history:
        given["history"] = args.history
    cfg = resolve(ReportConfig, *layers(args, given))
    result = run_report(cfg)
    print(_summary(result))
    print(f"report written to {cfg.out_url}/report.html")


def _summary(result: dict[str, Any]) -> str:
    """Both distributions of the report's lead column, and the duplicate counts, as printed lines."""
    column = result["columns"][result["column"]]
    lines = []
    for name in ("gen_train", "train_train"):
        d = column[name]
        above = ", ".join(
            f">= {a['threshold']:.3g}: {a['fraction']:.2%} [{a['ci95'][0]:.2%}, {a['ci95'][1]:.2%}]"
            for a in d["above"].values()
        )
        mean = "-" if d["mean"] is None else f"{d['mean']:.4f}"
        lines.append(f"{name:<11} {result['column']}: n={d['n']} mean={mean} {above}")
    dup = result["duplicates"]
    lines.append(
        f"duplicates (score >= {dup['radius']}): matched images {dup['matched']['mean']} on average "
        f"({dup['matched']['images']} images), random {dup['random']['mean']} ({dup['random']['images']})"
    )
    return "\n".join(lines)


JOB = Job(
    name="report",
    summary="statistics (gen→train vs train→train), duplicates and a self-contained HTML report of a scan",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.report.config:ReportConfig",
    uses_ray=False,
)

if __name__ == "__main__":
    sys.exit(JOB.main())
