"""``copyscan scan`` / ``python -m copyscan.jobs.scan``: search generated images against a copyscan index."""

from __future__ import annotations

import argparse
import json
import sys

from copyscan.jobs._runtime import Job, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="URL of a finished copyscan index")
    parser.add_argument("--queries", help="folder of generated images, or webdataset shards of them")
    parser.add_argument("--out", help="output URL of the scan (matches/, summary.json, run.yaml)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    explicit = {"index": args.index, "queries": args.queries, "out": args.out, "mode": args.mode}
    cfg = resolve(ScanConfig, *layers(args, explicit))
    summary = run_scan(cfg)
    names = ("queries", "embedded", "rejected", "rejected_by_reason", "matches", "top1_score")
    shown = {k: summary[k] for k in names if k in summary}
    skipped = summary.get("skipped") or {}
    if skipped.get("count"):  # files of the query folder that are not queries, and why (all in summary.json)
        shown["skipped"] = {**skipped, "files": skipped["files"][:10]}
    print(json.dumps({"out": cfg.out, **shown}, indent=2))


JOB = Job(
    name="scan",
    summary="search generated images against an index; write matches/ and summary.json",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.scan_config:ScanConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
