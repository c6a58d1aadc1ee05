"""``copyscan memorized`` / ``python -m copyscan.jobs.memorized``: find memorised prompts from generations
alone.

Carlini et al.'s generate-and-filter: the generations of each prompt (webdataset shards with the prompt
in ``.txt``/``.json``, or a folder of images with manifest.parquet/.jsonl/.csv: path, prompt) are
connected when their tiled ℓ2 is below ``edge_threshold``; a prompt whose largest clique has at least
``min_clique`` generations is flagged. Writes ``OUT/memorized.parquet`` (every prompt, flagged first,
ranked by mean distance inside the clique) and ``OUT/summary.json``. One Ray task per batch of prompts.
"""

from __future__ import annotations

import argparse
import json
import sys

from copyscan.jobs._runtime import Job, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--generations", help="webdataset shards of generations, or an image folder with a manifest"
    )
    parser.add_argument("--out", help="output URL (memorized.parquet, summary.json, memorized.yaml)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.memorized.config import MemorizedConfig
    from copyscan.search.memorized.memorized_ray import run_memorized

    explicit = {"generations": args.generations, "out": args.out, "mode": args.mode}
    cfg = resolve(MemorizedConfig, *layers(args, explicit))
    summary = run_memorized(cfg)
    shown = {
        k: summary[k] for k in ("prompts", "generations", "flagged", "errors", "top_flagged") if k in summary
    }
    print(json.dumps({"out": cfg.out, **shown}, indent=2))


JOB = Job(
    name="memorized",
    summary="flag prompts whose generations form a clique of near-identical images (Carlini et al.)",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.memorized.config:MemorizedConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
