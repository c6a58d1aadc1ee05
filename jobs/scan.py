"""``copyscan scan`` / ``python -m jobs.scan``: search generated images against a copyscan index."""

from __future__ import annotations

import argparse
import json
import sys

from jobs._runtime import add_common_arguments, layers, run_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="URL of a finished copyscan index")
    parser.add_argument("--queries", help="folder of generated images, or webdataset shards of them")
    parser.add_argument("--out", help="output URL of the scan (matches/, summary.json, run.yaml)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from indexing.runtime.config import resolve
    from search.scan_config import ScanConfig

    def body() -> None:
        from search.scan_ray import run_scan

        explicit = {"index": args.index, "queries": args.queries, "out": args.out, "mode": args.mode}
        cfg = resolve(ScanConfig, *layers(args, explicit))
        summary = run_scan(cfg)
        shown = {
            k: summary[k]
            for k in ("queries", "embedded", "rejected", "matches", "top1_score")
            if k in summary
        }
        print(json.dumps({"out": cfg.out, **shown}, indent=2))

    return run_job(args, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.scan", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
