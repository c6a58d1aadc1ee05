"""``copyscan calibrate`` / ``python -m jobs.calibrate``: thresholds for a chosen precision, from the index.

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

from jobs._runtime import add_common_arguments, init_ray, layers, run_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="URL of a finished copyscan index")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from indexing.runtime.config import resolve

    def body() -> None:
        from search.calibrate.config import CalibrateConfig
        from search.calibrate.whole import format_table, run_calibrate

        cfg = resolve(CalibrateConfig, *layers(args, {"index": args.index}))
        if cfg.partial:  # partial copies are calibrated with a real scan
            init_ray(args.ray_address, args.num_cpus)
        report = run_calibrate(cfg)
        print(format_table(report))
        print(f"thresholds written to {cfg.index}/calibration.json and its manifest")

    return run_job(args, body, use_ray=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.calibrate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
