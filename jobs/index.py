"""``copyscan index`` / ``python -m copyscan.jobs.index``: embed LAION-format shards and build a sharded FAISS
index."""

from __future__ import annotations

import argparse
import json
import sys

from copyscan.jobs._runtime import Job, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards", help="img2dataset webdataset tars: brace pattern, glob, folder or list file"
    )
    parser.add_argument("--out", help="output URL of the index (local path, s3://bucket/prefix, ...)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve

    cfg = resolve(IndexConfig, *layers(args, {"shards": args.shards, "out": args.out, "mode": args.mode}))
    manifest = run_index(cfg)
    shown = {
        "index": cfg.out,
        "vectors": manifest["ntotal"],
        "rejected": manifest["rejected_total"],
        "factory": manifest["index"]["factory"],
        "index_shards": len(manifest["index_shards"]),
        "seconds": manifest["timings"],
    }
    print(json.dumps(shown, indent=2))


JOB = Job(
    name="index",
    summary="embed LAION-format webdataset shards and build a sharded FAISS index",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.indexing.index_config:IndexConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
