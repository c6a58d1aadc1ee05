"""``copyscan merge --index URL max_shard_vectors=N`` / ``python -m copyscan.jobs.merge``: fewer, larger index
shards.

Repacks a finished IVF index's consecutive small shards into shards of at most ``max_shard_vectors``
vectors by appending their inverted lists (no vector is re-read or re-encoded; ids are kept), writes them
under ``index/<factory>/merged/`` with a marker each, and rewrites the manifest last, so an interrupted merge
resumes and scans see the old layout or the new one, never a mix. Fewer shards mean fewer coarse
quantizers and re-rank passes per query (docs/scale.md). A later ``copyscan index`` rerun keeps the merged
layout. Runs in this process (it moves inverted lists, one merged shard in memory at a time).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from copyscan.indexing.runtime.config import key
from copyscan.jobs._runtime import Job, layers


@dataclass(frozen=True)
class MergeConfig:
    """Every knob of ``copyscan merge``; set with a YAML file (``--config``) and/or ``key=value``."""

    index: str = key(help="URL of a finished copyscan index")
    max_shard_vectors: int = key(10_000_000, "vectors per merged shard at most")
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (``copyscan.indexing.runtime.config.resolve`` reports them with bad
        types)."""
        return ["max_shard_vectors must be >= 1"] if self.max_shard_vectors < 1 else []


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", help="URL of a finished copyscan index")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.build.merge_shards import merge_index_shards
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store.manifest import load_manifest

    cfg = resolve(MergeConfig, *layers(args, {"index": args.index}))
    before = len(load_manifest(cfg.index, cfg.storage_options)["index_shards"])
    manifest = merge_index_shards(cfg.index, cfg.max_shard_vectors, cfg.storage_options)
    after = len(manifest["index_shards"])
    if after == before:
        print(f"{cfg.index}: {before} index shard(s), none to merge under {cfg.max_shard_vectors:,} vectors")
    else:
        print(f"{cfg.index}: {before} index shards merged into {after}")


JOB = Job(
    name="merge",
    summary="repack a finished index's small shards into fewer, larger ones",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.jobs.merge:MergeConfig",
    uses_ray=False,
)

if __name__ == "__main__":
    sys.exit(JOB.main())
