"""``GenerateConfig``: every knob of ``copyscan generate`` (the sampler and the score: ``sampling.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copyscan.indexing.index_config import MODES
from copyscan.indexing.runtime.config import key

SCHEDULERS = ("", "ddim", "pndm", "euler", "dpm", "lms")
CAPTION_PICKS = ("random", "duplicated")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class GenerateConfig:
    """Every knob of ``copyscan generate``; YAML file (``--config``) and/or ``key=value``."""

    checkpoint: str = key(help="diffusers Stable Diffusion folder (local path or fsspec URL)")
    out: str = key(help="output URL (shards/, markers/, prompt_scores.parquet, summary.json)")
    prompts: str = key("", "text file (one prompt a line) or parquet (column prompt or caption) of prompts")
    # captions of the training set (the Somepalli setting): read from an index's metadata parquet files
    captions_from: str = key("", "copyscan index URL whose training captions are sampled as prompts")
    captions: int = key(0, "captions sampled from captions_from (0 = none)")
    caption_pick: str = key("random", "random (seeded) or duplicated (the most repeated captions first)")
    mode: str = key(
        "resume", "resume: skip finished shards; overwrite: delete a previous copyscan output first"
    )
    per_prompt: int = key(4, "generations per prompt, each with its own recorded seed")
    seed: int = key(0, "base seed: caption sampling and every generation's seed derive from it")
    steps: int = key(50, "denoising steps")
    guidance: float = key(7.5, "classifier-free guidance scale (> 1: the score needs both halves)")
    width: int = key(512, "image width in pixels (a multiple of 8)")
    height: int = key(512, "image height in pixels (a multiple of 8)")
    scheduler: str = key("", 'ddim, pndm, euler, dpm (DPM-Solver++) or lms; "" = the checkpoint\'s own')
    score_steps: int = key(1, "first sampling steps the memorisation score averages (Wen et al.)")
    batch_size: int = key(8, "generations per UNet batch")
    prompts_per_shard: int = key(16, "prompts per output shard (the unit of work and resume)")
    jpeg_quality: int = key(95, "JPEG quality of the stored generations")
    dtype: str = key("auto", "auto (float16 on a GPU, float32 on the CPU), float32, float16 or bfloat16")
    actors: int = key(0, "generation actors; 0 = one per GPU in the cluster, one CPU actor without GPUs")
    actor_gpus: float = key(1.0, "GPUs per actor when the cluster has GPUs")
    actor_cpus: float = key(1.0, "CPUs per actor")
    torch_threads: int = key(0, "torch threads per actor; 0 = torch's default")
    cache_dir: str = key("", 'local copy of a remote checkpoint; "" = $COPYSCAN_CACHE or ~/.cache/copyscan')
    retries: int = key(2, "extra attempts for a failed shard")
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    # what changes the images, their seeds or the plan: a resumed run must keep them
    RESUME_KEYS = (
        "checkpoint",
        "prompts",
        "captions_from",
        "captions",
        "caption_pick",
        "per_prompt",
        "seed",
        "steps",
        "guidance",
        "width",
        "height",
        "scheduler",
        "score_steps",
        "batch_size",
        "prompts_per_shard",
        "jpeg_quality",
        "dtype",
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (reported with bad types by ``config.resolve``)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.captions < 0 or (self.captions and not self.captions_from):
            problems.append("captions must be >= 0, and captions > 0 needs captions_from=INDEX")
        if self.caption_pick not in CAPTION_PICKS:
            problems.append(f"caption_pick must be one of {', '.join(CAPTION_PICKS)}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler must be one of {', '.join(map(repr, SCHEDULERS))}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        for name in ("per_prompt", "steps", "batch_size", "prompts_per_shard"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.width <= 0 or self.height <= 0 or self.width % 8 or self.height % 8:
            problems.append(
                f"width and height must be positive multiples of 8, not {self.width}x{self.height}"
            )
        if self.guidance <= 1:
            problems.append(
                "guidance must be > 1: the score compares the two halves of classifier-free guidance"
            )
        if not 1 <= self.score_steps <= self.steps:
            problems.append(f"score_steps must be between 1 and steps ({self.steps})")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append("jpeg_quality must be between 1 and 100")
        if self.actors < 0 or self.actor_gpus < 0 or self.actor_cpus <= 0 or self.retries < 0:
            problems.append("actors, actor_gpus and retries must be >= 0, actor_cpus positive")
        return problems
