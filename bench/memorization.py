"""Does the memorisation score (Wen et al.; ``search/generate/sampling.py``) separate memorised prompts?
JSON on stdout.

A small text-conditional latent diffusion model is trained on CPU from scratch on real images
(``real_image_files``, the ``art`` domain) where ``--memorised`` captions each have exactly one image,
repeated ``--repeats`` times, and ``--others`` captions each have ``--per-other`` different images (the
same number of training rows per caption by default, so both groups are seen equally often). Captions
are dropped to the empty prompt with probability ``--cfg-dropout`` (classifier-free guidance training,
so ε(x_t, ∅) is the unconditional model the score subtracts). The model is a Stable Diffusion pipeline
in miniature, built in code as ``tests/conftest.py``'s ``tiny_sd_checkpoint``: an AutoencoderKL (trained
first as an autoencoder for ``--vae-steps``, latents at half the image size), a 2-layer CLIPTextModel
over a vocabulary of letters and a UNet2DConditionModel (trained together for ``--steps``), a DDIM
scheduler; it is saved with ``save_pretrained`` into ``--out`` (``copyscan generate --checkpoint OUT/model``
runs on it as it is).

Then the project's own sampler (``sampling.Sampler`` loaded from that folder) makes ``--per-prompt``
generations of every caption, and the bench reports:

- ``auc``: the area under the ROC curve of the per-prompt score (mean over its generations of the
  first-step ‖ε(x_t, c) − ε(x_t, ∅)‖₂) with memorised captions as positives (1 = perfect separation,
  0.5 = chance), and the same for the mean over all steps;
- ``cliques``: ``copyscan memorized``'s per-prompt clique (``discover.prompt_clique``, its default
  graph: 128 px, 4 × 4 tiles, edge below 0.08, flagged at ``min_clique`` generations) on the same
  generations: how many of each group it flags;
- ``nearest_training``: for each generation, its nearest training image by the same tiled ℓ2 (the
  exact stand-in for a scan's best match on a training set this small); the share of generations within
  the clique edge threshold of their caption's own training image(s);
- with ``--copyscan-jobs``, ``copyscan_jobs`` (``bench/memorization_jobs.py``): the saved checkpoint through ``copyscan generate``,
  ``copyscan memorized`` and ``copyscan index`` + ``copyscan scan`` (a local Ray cluster, ~1–2 minutes).

Everything is seeded by ``--seed`` (weights, batches, noise, generation seeds): a rerun on the same
machine and library versions gives the same figures. The default run takes ~8 CPU-minutes on one thread.

``python -m bench.memorization [--steps 1500] [--vae-steps 400] [--size 32] [--seed 0] [--threads 1]
[--copyscan-jobs] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORDS = (
    "amber basil cedar delta ember fjord grove heron iris jade kelp lotus maple nova opal pearl quill "
    "raven sage tulip umber vale willow yarrow zinnia acorn birch coral dune elm fern gale"
).split()


@dataclass(frozen=True)
class Caption:
    text: str
    memorised: bool
    images: tuple[int, ...]  # indices into the image list, one per training row


def plan_captions(memorised: int, repeats: int, others: int, per_other: int) -> list[Caption]:
    """The training set: ``memorised`` captions each with one image repeated ``repeats`` times, then
    ``others`` captions each with ``per_other`` distinct images; every image is used by one caption only
    (image indices 0 .. memorised + others · per_other − 1, in caption order)."""
    if memorised + others > len(WORDS) ** 2:
        raise ValueError(f"at most {len(WORDS) ** 2} captions")
    captions, image = [], 0
    for i in range(memorised + others):
        text = f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i + 3) % len(WORDS)]}"
        if i < memorised:
            captions.append(Caption(text, True, (image,) * repeats))
            image += 1
        else:
            captions.append(Caption(text, False, tuple(range(image, image + per_other))))
            image += per_other
    return captions


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """P(a positive's score > a negative's), ties counting one half (the Mann–Whitney U statistic)."""
    pos = np.asarray(positives, dtype=np.float64)[:, None]
    neg = np.asarray(negatives, dtype=np.float64)[None, :]
    if not pos.size or not neg.size:
        raise ValueError("the AUC needs at least one positive and one negative")
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def load_images(count: int, size: int) -> np.ndarray:
    """(count, size, size, 3) uint8: the first ``count`` real images, centre-cropped and resized."""
    from PIL import Image

    from copyscan.indexing.read.images import open_rgb
    from copyscan.jobs.demo.sample_images import real_image_files
    from copyscan.search.verify.pixel import align

    out = []
    for path in real_image_files(count):
        out.append(align(open_rgb(path), 4 * size))
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in out])


def build_pipeline(  # noqa: ANN201
    folder: str, size: int, seed: int, width: int = 32, vae_width: int = 16, heads: int = 8, groups: int = 8
):
    """A randomly initialised miniature Stable Diffusion pipeline (the components' shapes only): a 2-block
    UNet2DConditionModel of ``width`` and ``2 × width`` channels (latents at half of ``size``), an
    AutoencoderKL of ``vae_width`` and ``2 × vae_width``, a 2-layer CLIPTextModel of ``width`` over a
    vocabulary of letters (its files written into ``folder``), a DDIM scheduler. Also the tests' checkpoint
    (tests/conftest.py ``tiny_sd_checkpoint``), at a smaller width."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        sample_size=size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=width // heads,
        norm_num_groups=groups,
    )
    vae = AutoencoderKL(
        block_out_channels=(vae_width, 2 * vae_width),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=size,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=100,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[c] = len(vocab)
        vocab[f"{c}</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train(pipe, images: np.ndarray, captions: list[Caption], args: argparse.Namespace) -> dict:  # noqa: ANN001
    """Trains the VAE as an autoencoder, then the UNet and text encoder on its latents (ε-prediction,
    captions dropped to "" with probability ``cfg_dropout``). Returns losses and seconds."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, S, S) in [-1, 1]
    t0 = time.perf_counter()
    vae_opt = torch.optim.AdamW(pipe.vae.parameters(), lr=1e-3)
    vae_loss = []
    for _ in range(args.vae_steps):
        batch = x[torch.randint(len(x), (args.batch,), generator=g)]
        posterior = pipe.vae.encode(batch).latent_dist
        recon = pipe.vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        vae_opt.zero_grad()
        loss.backward()
        vae_opt.step()
        vae_loss.append(loss.item())
    vae_seconds = time.perf_counter() - t0
    pipe.vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean
        pipe.vae.register_to_config(scaling_factor=float(1 / latents.std()))
        latents = latents * pipe.vae.config.scaling_factor
        recon = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        vae_rmse = float((recon.clamp(-1, 1) - x).square().mean().sqrt() / 2)  # in [0, 1] pixel units

    rows = [(c, i) for c, cap in enumerate(captions) for i in cap.images]
    texts = [cap.text for cap in captions] + [""]
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = ids.input_ids
    row_caption = torch.tensor([c for c, _ in rows])
    row_image = torch.tensor([i for _, i in rows])
    alphas = pipe.scheduler.alphas_cumprod
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr)
    pipe.unet.train()
    pipe.text_encoder.train()
    t1, losses = time.perf_counter(), []
    for _ in range(args.steps):
        pick = torch.randint(len(rows), (args.batch,), generator=g)
        caption = row_caption[pick].clone()
        caption[torch.rand(args.batch, generator=g) < args.cfg_dropout] = len(captions)  # the "" row
        x0 = latents[row_image[pick]]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (args.batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = pipe.text_encoder(ids[caption])[0]
        loss = F.mse_loss(pipe.unet(xt, t, encoder_hidden_states=states).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pipe.unet.eval()
    pipe.text_encoder.eval()
    tail = max(1, len(losses) // 10)
    return {
        "vae_seconds": round(vae_seconds, 1),
        "vae_final_loss": float(np.mean(vae_loss[-tail:])) if vae_loss else None,
        "vae_reconstruction_rmse": vae_rmse,
        "unet_seconds": round(time.perf_counter() - t1, 1),
        "unet_first_loss": float(np.mean(losses[:tail])) if losses else None,
        "unet_final_loss": float(np.mean(losses[-tail:])) if losses else None,
        "training_rows": len(rows),
    }


def evaluate(folder: str, images: np.ndarray, captions: list[Caption], args: argparse.Namespace) -> dict:
    """Generations from the saved folder with the project's sampler; the AUCs, cliques, nearest training."""
    from PIL import Image

    from copyscan.search.generate.prompts import generation_seed
    from copyscan.search.generate.sampling import Sampler, SampleSettings
    from copyscan.search.memorized.discover import GraphSpec, prompt_clique
    from copyscan.search.verify.pixel import align, pairwise_tiled

    sampler = Sampler(folder, scheduler="ddim")
    settings = SampleSettings(args.sample_steps, args.guidance, args.size, args.size, 1)
    spec = GraphSpec(min_clique=args.min_clique)
    train = np.stack([align(Image.fromarray(a), spec.size) for a in images])
    t0 = time.perf_counter()
    per_prompt = []
    for cap in captions:
        seeds = [generation_seed(args.seed, cap.text, g) for g in range(args.per_prompt)]
        batch = sampler.sample([cap.text] * len(seeds), seeds, settings)
        gens = np.stack([align(Image.fromarray(a), spec.size) for a in batch.images])
        clique = prompt_clique(cap.text, gens, [("gen", str(g)) for g in range(len(gens))], spec)
        D = pairwise_tiled(np.concatenate([gens, train]))[: len(gens), len(gens) :]
        nearest = D.argmin(axis=1)
        own = sorted(set(cap.images))
        near_own = D[:, own].min(axis=1) < spec.threshold
        per_prompt.append(
            {
                "caption": cap.text,
                "memorised": cap.memorised,
                "score": float(batch.scores.mean()),
                "score_all_steps": float(batch.norms.mean()),
                "clique_size": clique["clique_size"],
                "flagged": clique["flagged"],
                "nearest_is_own": float(np.isin(nearest, own).mean()),
                "near_copy_of_own": float(near_own.mean()),
                "nearest_distance": float(D.min(axis=1).mean()),
            }
        )
    seconds = time.perf_counter() - t0
    mem = [p for p in per_prompt if p["memorised"]]
    other = [p for p in per_prompt if not p["memorised"]]

    def group(rows: list[dict]) -> dict:
        return {
            "prompts": len(rows),
            "score_mean": float(np.mean([r["score"] for r in rows])),
            "flagged_by_clique": sum(r["flagged"] for r in rows),
            "clique_size_mean": float(np.mean([r["clique_size"] for r in rows])),
            "nearest_is_own": float(np.mean([r["nearest_is_own"] for r in rows])),
            "near_copy_of_own": float(np.mean([r["near_copy_of_own"] for r in rows])),
        }

    return {
        "auc_first_step": roc_auc([p["score"] for p in mem], [p["score"] for p in other]),
        "auc_all_steps": roc_auc([p["score_all_steps"] for p in mem], [p["score_all_steps"] for p in other]),
        "auc_clique_size": roc_auc([p["clique_size"] for p in mem], [p["clique_size"] for p in other]),
        "memorised": group(mem),
        "others": group(other),
        "sampling_seconds": round(seconds, 1),
        "prompts": per_prompt,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memorised", type=int, default=8, help="captions with one repeated image")
    parser.add_argument("--repeats", type=int, default=16, help="training rows of a memorised caption")
    parser.add_argument("--others", type=int, default=8, help="captions with many images")
    parser.add_argument("--per-other", type=int, default=16, help="distinct images of such a caption")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (latents: half)")
    parser.add_argument("--steps", type=int, default=1500, help="UNet training steps")
    parser.add_argument("--vae-steps", type=int, default=400, help="autoencoder training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--per-prompt", type=int, default=10, help="generations per caption")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM sampling steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--min-clique", type=int, default=5, help="clique size that flags a prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument(
        "--copyscan-jobs", action="store_true", help="also run generate, memorized, index and scan (Ray)"
    )
    parser.add_argument("--out", default="", help="keep the model here (OUT/model); default: a temp dir")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    captions = plan_captions(args.memorised, args.repeats, args.others, args.per_other)
    images = load_images(max(max(c.images) for c in captions) + 1, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(args.out or tmp, "model")
        pipe = build_pipeline(os.path.join(tmp, "tokenizer"), args.size, args.seed)
        training = train(pipe, images, captions, args)
        pipe.save_pretrained(folder)
        result = evaluate(folder, images, captions, args)
        if args.copyscan_jobs:
            from bench.memorization_jobs import copyscan_jobs

            result["copyscan_jobs"] = copyscan_jobs(folder, images, captions, args, args.out or tmp)
    return {
        "bench": "memorization",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "training": training,
        **result,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
