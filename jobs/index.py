"""``copyscan index`` / ``python -m jobs.index``: embed LAION-format shards and build a sharded FAISS index."""

from __future__ import annotations

import argparse
import json
import sys

from jobs._runtime import add_common_arguments, layers, run_job


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", help="img2dataset webdataset tars: brace pattern, glob, folder or list file"
    )
    parser.add_argument("--out", help="output URL of the index (local path, s3://bucket/prefix, ...)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from indexing.index_config import IndexConfig
    from indexing.runtime.config import resolve

    def body() -> None:
        from indexing.index_ray import run_index

        cfg = resolve(IndexConfig, *layers(args, {"shards": args.shards, "out": args.out, "mode": args.mode}))
        manifest = run_index(cfg)
        print(
            json.dumps(
                {
                    "index": cfg.out,
                    "vectors": manifest["ntotal"],
                    "rejected": manifest["rejected_total"],
                    "factory": manifest["index"]["factory"],
                    "index_shards": len(manifest["index_shards"]),
                    "seconds": manifest["timings"],
                },
                indent=2,
            )
        )

    return run_job(args, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
