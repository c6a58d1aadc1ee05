"""Calibrate the edge threshold of the memorised-prompt graph (``copyscan memorized``): JSON on stdout.

Carlini et al. connect two generations of one prompt when their tiled ℓ2 is below a threshold they do not
publish. Two distributions bound it, both on real images (``copyscan.jobs.demo.sample_images``) aligned as the
job aligns generations (short side, centre crop, ``graph_size`` px, 4 × 4 tiles):

- **different images**: every pair of N distinct real images (what unrelated generations look like at
  best: real photographs and paintings share colour and layout far less than generations of one prompt,
  so also the **same image re-framed**: crops shifted by 5 % and 10 % of the side, a "variation" of one
  composition that is not a pixel copy);
- **near-copies**: the image against itself after what separates two memorised generations (pixel noise,
  a small colour shift, JPEG, a few pixels of shift, a slight blur, and all of them combined).

``python -m bench.clique_threshold [--images 300] [--graph-size 128]``
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from copyscan.indexing.read.images import open_rgb
from copyscan.jobs.demo.sample_images import real_image_files
from copyscan.search.verify.pixel import align, pairwise_tiled, pixel_distances


def _shift_crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * fraction), round(h * fraction)
    return img.crop((dx, dy, w, h)).resize((w, h), Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = np.clip(x + rng.normal(0.0, sigma, x.shape), 0.0, 1.0)
    return Image.fromarray((x * 255.0 + 0.5).astype(np.uint8))


def _variants(img: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    # img is already 512 x 512 (the generation size); every variant stays 512 x 512
    return {
        "noise_0.03": _noise(img, 0.03, rng),
        "noise_0.06": _noise(img, 0.06, rng),
        "brightness_1.05": ImageEnhance.Brightness(img).enhance(1.05),
        "colour_0.9": ImageEnhance.Color(img).enhance(0.9),
        "jpeg_q75": _jpeg(img, 75),
        "shift_4px": img.transform(
            img.size, Image.Transform.AFFINE, (1, 0, 4, 0, 1, 4), Image.Resampling.BICUBIC
        ),
        "blur_r1": img.filter(ImageFilter.GaussianBlur(1.0)),
        "combined": _jpeg(
            _noise(
                ImageEnhance.Brightness(img.filter(ImageFilter.GaussianBlur(0.7))).enhance(1.03), 0.03, rng
            ),
            80,
        ),
        "reframe_5pct": _shift_crop(img, 0.05),
        "reframe_10pct": _shift_crop(img, 0.10),
    }


def _stats(values: np.ndarray) -> dict[str, float]:
    return {
        "min": float(values.min()),
        **{f"p{q}": float(np.percentile(values, q)) for q in (0.1, 1, 5, 50, 95, 99)},
        "max": float(values.max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--graph-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    files = real_image_files(args.images)
    base = [Image.fromarray(align(open_rgb(p), 512)) for p in files]
    small = np.stack([align(img, args.graph_size) for img in base])
    D = pairwise_tiled(small)
    iu = np.triu_indices(len(files), 1)
    different = D[iu]
    variants: dict[str, list[float]] = {}
    full_res: dict[str, list[float]] = {}
    for img in base:
        ref_small = align(img, args.graph_size)[None]
        ref_full = np.asarray(img)[None]
        for name, var in _variants(img, rng).items():
            variants.setdefault(name, []).append(
                float(pixel_distances(ref_small, align(var, args.graph_size)[None])[1][0])
            )
            full_res.setdefault(name, []).append(
                float(pixel_distances(ref_full, np.asarray(var)[None])[1][0])
            )
    nearest_other = np.sort(D + np.eye(len(files), dtype=np.float32) * 9, axis=1)[:, 0]
    print(
        json.dumps(
            {
                "images": len(files),
                "graph_size": args.graph_size,
                "tiles": 4,
                "different_images_tiled": _stats(different),
                "nearest_other_image_tiled": _stats(nearest_other),
                "variants_tiled_at_graph_size": {k: _stats(np.array(v)) for k, v in variants.items()},
                "variants_tiled_at_512": {k: _stats(np.array(v)) for k, v in full_res.items()},
                "seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
