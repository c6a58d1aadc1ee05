"""``copyscan generate`` / ``python -m copyscan.jobs.generate``: run a diffusers checkpoint on prompts, with
the memorisation score of every generation.

Loads a Stable Diffusion checkpoint (a diffusers folder, local or on object storage) once per Ray actor
(one per GPU; a CPU actor without GPUs), generates ``per_prompt`` images for each prompt (a text or
parquet file of prompts, captions drawn from an index's training metadata, or both), each from its own
recorded seed, and writes webdataset shards that ``copyscan scan`` and ``copyscan memorized`` read
directly: ``GEN/shards/NNNNN.tar`` with ``{key}.jpg``, ``{key}.json`` (prompt, seed, settings,
checkpoint id, memorisation score) and ``{key}.txt``. The memorisation score is Wen et al.'s
‖ε(x_t, c) − ε(x_t, ∅)‖ from the guided UNet batch (``search/generate/sampling.py``); per-prompt scores
go to ``GEN/prompt_scores.parquet``. Resumable per shard.
"""

from __future__ import annotations

import argparse
import json
import sys

from copyscan.jobs._runtime import Job, layers


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="diffusers Stable Diffusion folder: local path or fsspec URL")
    parser.add_argument("--prompts", help="text file (one prompt a line) or parquet file of prompts")
    parser.add_argument("--out", help="output URL (shards/, markers/, prompt_scores.parquet, summary.json)")
    parser.add_argument("--mode", choices=["resume", "overwrite"], help="resume (default) or overwrite")


def _body(args: argparse.Namespace) -> None:
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.generate.config import GenerateConfig
    from copyscan.search.generate.generate_ray import run_generate

    explicit = {"checkpoint": args.checkpoint, "prompts": args.prompts, "out": args.out, "mode": args.mode}
    cfg = resolve(GenerateConfig, *layers(args, explicit))
    summary = run_generate(cfg)
    shown = {k: summary[k] for k in ("checkpoint_id", "shards", "prompts", "generations", "score")}
    print(json.dumps({"out": cfg.out, **shown, "top_prompts": summary["top_prompts"][:5]}, indent=2))


JOB = Job(
    name="generate",
    summary="generate images of a diffusers checkpoint on Ray, with a memorisation score per prompt",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.generate.config:GenerateConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
