"""``copyscan report RUN`` / ``python -m jobs.report RUN``: statistics, duplicates and an HTML report.

Reads a finished scan (matches/ and summary.json) and the index it scanned; writes ``RUN/report/``
(or ``out=URL``): ``stats.json``, ``histograms.parquet``, ``similarities.parquet``, ``duplicates.parquet``
and ``report.html`` (self-contained: open it in any browser, mail it, attach it to a ticket). Runs in
this process, one index shard in memory at a time.
"""

from __future__ import annotations

import argparse
import sys

from jobs._runtime import add_common_arguments, layers, run_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_url", metavar="RUN", help="URL of a finished scan output")
    parser.add_argument("--history", help="nightly history URL: adds the trend across checkpoints")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from indexing.runtime.config import resolve

    def body() -> None:
        from search.report.run import ReportConfig, run_report

        given = {"run": args.run_url}
        if args.history:
            given["history"] = args.history
        cfg = resolve(ReportConfig, *layers(args, given))
        result = run_report(cfg)
        column = result["columns"][result["column"]]
        for name in ("gen_train", "train_train"):
            d = column[name]
            above = ", ".join(
                f">= {a['threshold']:.3g}: {a['fraction']:.2%} [{a['ci95'][0]:.2%}, {a['ci95'][1]:.2%}]"
                for a in d["above"].values()
            )
            mean = "-" if d["mean"] is None else f"{d['mean']:.4f}"
            print(f"{name:<11} {result['column']}: n={d['n']} mean={mean} {above}")
        dup = result["duplicates"]
        print(
            f"duplicates (score >= {dup['radius']}): matched images {dup['matched']['mean']} on average "
            f"({dup['matched']['images']} images), random {dup['random']['mean']} ({dup['random']['images']})"
        )
        print(f"report written to {cfg.out_url}/report.html")

    return run_job(args, body, use_ray=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
