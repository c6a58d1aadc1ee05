"""The ``copyscan`` command: ``index``, ``merge``, ``scan``, ``calibrate``, ``nightly``, ``report``,
``memorized``, ``query``, ``submit`` and ``demo``, built from each job module's ``JOB`` declaration.

Job modules import their libraries (torch, Ray, faiss) inside their bodies, so declaring every command
here costs no heavy import: only the command run loads what it needs.
"""

from __future__ import annotations

import argparse
import sys

from jobs import calibrate, demo, index, memorized, merge, nightly, query, report, scan, submit
from jobs._runtime import Job

JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        index.JOB,
        merge.JOB,
        scan.JOB,
        calibrate.JOB,
        nightly.JOB,
        report.JOB,
        memorized.JOB,
        query.JOB,
        submit.JOB,
        demo.JOB,
    )
}


def main(argv: list[str] | None = None) -> int:
    """``copyscan CMD [ARGS]``: parse ``argv`` (default: the command line) and run CMD's job."""
    parser = argparse.ArgumentParser(
        prog="copyscan", description="Find training-data copies in generated images."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, job in JOBS.items():
        # argparse %-formats help strings: a summary's "90%" would otherwise break `copyscan --help`
        sub_parser = sub.add_parser(name, help=job.summary.replace("%", "%%"), description=job.description)
        job.add_arguments(sub_parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return JOBS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
