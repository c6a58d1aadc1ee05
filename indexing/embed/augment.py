"""Copy augmentations: what a generation that copies a training image tends to look like.

``copy_augment`` makes a whole-image copy (crop, small rotation, colour shifts, rescale, a caption, JPEG);
``paste_partial`` puts one image inside another (a copied object in a new scene). Both draw every choice from
the ``numpy.random.Generator`` passed in, so the same seed gives the same pixels.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from copyscan.indexing.read.images import composite_rgb

CROP_FRACTION = (0.60, 0.90)  # of each side, drawn independently for width and height
MAX_ROTATION_DEG = 8.0
COLOUR_CHANGE = (0.25, 0.40)  # |factor − 1| for brightness, contrast and saturation, sign drawn at random
RESCALE = (0.7, 1.4)
JPEG_QUALITY = (40, 85)
WORDS = (
    "sale", "new", "photo", "art", "2024", "best", "free", "copy", "stock", "preview", "sample", "hd", "wallpaper",
    "poster", "original", "dream", "fantasy", "sky", "portrait", "epic",
)  # fmt: skip


def key_seed(key: str) -> int:
    """A 64-bit seed from an image's key: augmentations seeded by it do not depend on where the image sits
    in its shard (img2dataset writes a shard's samples in download-completion order)."""
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    out = Image.open(buffer)
    out.load()
    return out


def _factor(rng: np.random.Generator) -> float:
    change = rng.uniform(*COLOUR_CHANGE)
    return float(1 + change if rng.random() < 0.5 else 1 - change)


def _caption(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
    size = max(10, int(min(img.size) * rng.uniform(0.05, 0.10)))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, img.width - (right - left))))
    y = int(rng.integers(0, max(1, img.height - (bottom - top))))
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw.text((x - left, y - top), text, font=font, fill=fill)
    return img


def copy_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A transformed copy of ``img`` (any mode; returned as RGB), as a generation copying it might be.

    In order: crop to 60–90 % of each side at a random place; rotate by up to ±8° (corners filled with the mean
    colour); brightness, contrast and saturation each changed by 25–40 % up or down; rescale by 0.7–1.4×;
    one to three words of text at 5–10 % of the short side; JPEG at quality 40–85.
    """
    img = composite_rgb(img)
    width, height = img.size
    crop_w = max(1, round(width * rng.uniform(*CROP_FRACTION)))
    crop_h = max(1, round(height * rng.uniform(*CROP_FRACTION)))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    img = img.crop((left, top, left + crop_w, top + crop_h))

    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    mean = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(0))
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=mean)

    img = ImageEnhance.Brightness(img).enhance(_factor(rng))
    img = ImageEnhance.Contrast(img).enhance(_factor(rng))
    img = ImageEnhance.Color(img).enhance(_factor(rng))

    scale = rng.uniform(*RESCALE)
    img = img.resize(
        (max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.BICUBIC
    )

    img = _caption(img, rng)
    return _jpeg(img, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))


def paste_partial(
    obj_img: Image.Image,
    scene_img: Image.Image,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 0.5),
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Paste ``obj_img`` into ``scene_img``: a partial copy. Returns (RGB image after JPEG, box).

    The object keeps its aspect ratio and is resized so its longer side is ``scale`` (drawn uniformly) times the
    scene's shorter side; it lands at a random place entirely inside the scene, transparency respected (a
    cut-out object is pasted without its background). ``box`` is (left, top, right, bottom) in pixels.
    JPEG quality is drawn from 60–90.
    """
    scene = composite_rgb(scene_img).copy()
    obj = obj_img.convert("RGBA")
    side = rng.uniform(*scale) * min(scene.size)
    ratio = side / max(obj.size)
    obj_w = max(1, min(scene.width, round(obj.width * ratio)))
    obj_h = max(1, min(scene.height, round(obj.height * ratio)))
    obj = obj.resize((obj_w, obj_h), Image.Resampling.LANCZOS)
    left = int(rng.integers(0, scene.width - obj_w + 1))
    top = int(rng.integers(0, scene.height - obj_h + 1))
    scene.paste(obj, (left, top), mask=obj.getchannel("A"))
    box = (left, top, left + obj_w, top + obj_h)
    return _jpeg(scene, int(rng.integers(60, 91))), box
