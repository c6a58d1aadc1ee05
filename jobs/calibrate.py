"""``copyscan calibrate`` / ``python -m copyscan.jobs.calibrate``: thresholds for a chosen precision, from the
index.

Copies a sample of the index's own training images (read back from its source shards), searches them, and
writes the thresholds of ``score`` and ``score_norm`` that reach 90 % and 99 % precision into
``INDEX/calibration.json`` and the manifest; ``copyscan scan`` then flags ``is_copy`` with them. Runs in
this process (a thousand images need no cluster); prints the precision/recall table. With ``partial=N
outside=URL`` it also pastes training images into outside scenes and scans them on Ray (local, or the
cluster of --ray-address / $RAY_ADDRESS) for the partial answer's thresholds (``is_partial_copy``).
"""

from __future__ import annotations

import argparse
import sys

from copyscan.jobs._runtime import Job, init_ray, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="URL of a finished copyscan index")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.calibrate.config import CalibrateConfig
    from copyscan.search.calibrate.whole import format_table, run_calibrate

    cfg = resolve(CalibrateConfig, *layers(args, {"index": args.index}))
    if cfg.partial:  # partial copies are calibrated with a real scan
        init_ray(args.ray_address, args.num_cpus)
    report = run_calibrate(cfg)
    print(format_table(report))
    print(f"thresholds written to {cfg.index}/calibration.json and its manifest")


JOB = Job(
    name="calibrate",
    summary="estimate the score thresholds for 90%/99% precision from the index's images",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.calibrate.config:CalibrateConfig",
    uses_ray=False,  # whole copies need no cluster; the body starts Ray for partial=N
)

if __name__ == "__main__":
    sys.exit(JOB.main())
