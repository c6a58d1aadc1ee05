"""A diffusers Stable Diffusion checkpoint sampled with classifier-free guidance, and Wen et al.'s
memorisation score read off the same UNet calls.

**The score** (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models"). At sampling step i (timestep t_i, i = 0 the noisiest), the guided UNet batch holds the
unconditional and the text-conditional halves, ε_θ(x_t, ∅) and ε_θ(x_t, c) (∅: the empty prompt's
embedding, as in Stable Diffusion's own guidance). The step's magnitude is

    d_i = ‖ε_θ(x_{t_i}, c) − ε_θ(x_{t_i}, ∅)‖₂

the L2 norm over the whole latent noise prediction (C × H/8 × W/8 values, not divided by their number,
as the paper's released code computes it per generation). A generation's score is the mean of d_i over
the first ``score_steps`` steps (default 1: the paper finds the first step alone already separates
memorised prompts, and it is available before the sample is finished), and a prompt's score is the mean
over its generations (``prompt_scores.parquet``; the paper averages over the generations of a prompt
too). Every d_i of every step is stored as well (``score_per_step``), so other aggregations need no
rerun. Memorised prompts drive the sample towards one training image whatever the noise, so their text
term is large. The score is a pre-screen: it needs the model's weights, it is not a copy, and values
are comparable only between runs with the same size, scheduler, steps and guidance (the norm grows with
the latent size). It costs nothing extra: the two halves are computed for guidance anyway.

**Sampling** is the pipeline's own components in a loop: text embeddings from ``encode_prompt``, initial
latents drawn on the CPU from ``torch.Generator().manual_seed(seed)`` per generation (so a seed gives the
same noise on any device and in any batch), ``scale_model_input`` → UNet on the doubled batch →
ε = ε_∅ + w · (ε_c − ε_∅) → ``scheduler.step``, then the VAE decode. Only deterministic schedulers are
offered (DDIM with η = 0, PNDM, Euler, DPM-Solver++), so an image is a function of its seed; batching
changes it only by float rounding.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import storage

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise CopyscanError(
            "copyscan generate needs diffusers and transformers: pip install 'copyscan[generate]'"
        ) from None
    return diffusers


def checkpoint_id(checkpoint: str, so: storage.StorageOptions | None = None) -> str:
    """``NAME@HASH``: the folder's name and 12 hex digits of SHA-256 over every file's relative path and
    size and the content of its JSON files (configs, ``model_index.json``): another training step or
    config gives another id without reading gigabytes of weights."""
    fs, root = storage.get_fs(checkpoint, so)
    root = root.rstrip("/")
    if not fs.isdir(root) or not fs.exists(f"{root}/model_index.json"):
        raise CopyscanError(f"checkpoint {checkpoint} is not a diffusers folder (no model_index.json)")
    digest = hashlib.sha256()
    for path, info in sorted(fs.find(root, detail=True).items()):
        rel = path[len(root) :].lstrip("/")
        digest.update(f"{rel}\0{info.get('size')}\0".encode())
        if rel.endswith(".json"):
            digest.update(fs.cat_file(path))
    return f"{root.rsplit('/', 1)[-1]}@{digest.hexdigest()[:12]}"


def local_checkpoint(checkpoint: str, ident: str, cache_dir: str, so: storage.StorageOptions | None) -> str:
    """A local folder holding ``checkpoint``: itself when local, else a copy in
    ``cache_dir/checkpoints/ID`` (copied to a temporary name, then renamed; reused when present)."""
    if storage.is_local(checkpoint):
        return storage.local_path(checkpoint)
    target = os.path.join(cache_dir, "checkpoints", ident.replace("/", "_"))
    if os.path.isdir(target):
        return target
    tmp = f"{target}.tmp-{os.getpid()}"
    fs, root = storage.get_fs(checkpoint, so)
    root = root.rstrip("/")
    for path in fs.find(root):
        local = os.path.join(tmp, path[len(root) :].lstrip("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(path, local)
    try:
        os.rename(tmp, target)
    except OSError:  # another actor of this node finished its copy first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class SampleSettings:
    steps: int
    guidance: float
    width: int
    height: int
    score_steps: int

    @classmethod
    def of(cls, cfg: Any) -> SampleSettings:
        return cls(cfg.steps, cfg.guidance, cfg.width, cfg.height, cfg.score_steps)


@dataclass
class Batch:
    """One batch's output: ``images`` (n, H, W, 3) uint8; ``norms`` (n, steps) float32, d_i per step;
    ``scores`` (n,) float32, the mean of the first ``score_steps`` norms."""

    images: np.ndarray
    norms: np.ndarray
    scores: np.ndarray


class Sampler:
    """One loaded pipeline (loaded once: an actor holds one) that samples batches of (prompt, seed)."""

    def __init__(self, folder: str, device: str = "cpu", dtype: str = "auto", scheduler: str = "") -> None:
        import torch

        diffusers = _diffusers()
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        self.dtype = getattr(torch, dtype)
        self.device = device
        diffusers.utils.logging.disable_progress_bar()  # one bar per component and actor, in the driver's log
        try:
            with warnings.catch_warnings():
                # diffusers ≥ 0.36 renames torch_dtype to dtype; 0.30 knows only torch_dtype
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                    folder, torch_dtype=self.dtype, safety_checker=None, requires_safety_checker=False
                )
        except (OSError, ValueError) as exc:
            raise CopyscanError(f"cannot load the diffusers checkpoint {folder}: {exc}") from exc
        if scheduler:
            cls = getattr(diffusers, SCHEDULER_CLASSES[scheduler])
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        if type(pipe.scheduler).__name__ not in SCHEDULER_CLASSES.values():
            raise CopyscanError(
                f"the checkpoint's scheduler {type(pipe.scheduler).__name__} is not deterministic or not "
                f"supported: choose scheduler=ddim, pndm, euler or dpm"
            )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.scheduler_name = type(pipe.scheduler).__name__

    def initial_latents(self, seeds: Sequence[int], width: int, height: int) -> Any:
        """(n, C, H/8, W/8) initial noise, one CPU generator per seed, scaled by ``init_noise_sigma``."""
        import torch

        pipe = self.pipe
        shape = (
            1,
            pipe.unet.config.in_channels,
            height // pipe.vae_scale_factor,
            width // pipe.vae_scale_factor,
        )
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        latents = torch.cat(noise).to(self.device, self.dtype)
        return latents * pipe.scheduler.init_noise_sigma

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings) -> Batch:
        """Generations of ``prompts[j]`` from ``seeds[j]``, with their per-step guidance norms."""
        import torch

        pipe = self.pipe
        with torch.inference_mode():
            cond, uncond = pipe.encode_prompt(list(prompts), self.device, 1, True)
            embeddings = torch.cat([uncond, cond])
            pipe.scheduler.set_timesteps(settings.steps, device=self.device)
            latents = self.initial_latents(seeds, settings.width, settings.height)
            norms = []
            for t in pipe.scheduler.timesteps:
                model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
                eps = pipe.unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
                eps_uncond, eps_text = eps.chunk(2)
                text_term = eps_text - eps_uncond
                # in float32: in float16 the difference of two close predictions loses digits
                norms.append((eps_text.float() - eps_uncond.float()).flatten(1).norm(dim=1))
                eps = eps_uncond + settings.guidance * text_term
                latents = pipe.scheduler.step(eps, t, latents, return_dict=False)[0]
            images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        norm_array = torch.stack(norms, dim=1).cpu().numpy().astype(np.float32)
        return Batch(
            images=(images * 255).round().astype(np.uint8),
            norms=norm_array,
            scores=norm_array[:, : settings.score_steps].mean(axis=1),
        )


def settings_record(settings: SampleSettings, sampler: Sampler) -> dict[str, Any]:
    """What every generation's JSON records of how it was sampled."""
    return {
        "steps": settings.steps,
        "guidance": settings.guidance,
        "width": settings.width,
        "height": settings.height,
        "scheduler": sampler.scheduler_name,
        "dtype": str(sampler.dtype).removeprefix("torch."),
        "score_steps": settings.score_steps,
    }


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
