"""Preprocessing: a decoded PIL image → the fixed-size uint8 RGB array an embedder takes.

Plain PIL and numpy, no torch: the decode tasks (``copyscan.indexing.embed.decode_ray``) run it on CPU
workers that never load a model, and start faster for not importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.images import composite_rgb

BACKGROUND_RGB = (255, 255, 255)

# PIL's filters are antialiased when downscaling; torchvision's Resize on a PIL image calls exactly these (and
# Resize(antialias=True) on tensors approximates them).
RESAMPLE = {
    "bilinear-antialiased": Image.Resampling.BILINEAR,
    "bicubic-antialiased": Image.Resampling.BICUBIC,
}


def make_preprocess(spec: dict[str, Any]) -> Callable[[Image.Image], np.ndarray]:
    """The preprocessing a spec describes: PIL image → (3, S, S) uint8.

    Kinds: "squash" (the effnet-lite0 descriptor's, ``preprocess``),
    "resize" (RGB, transparency composited on ``background``, both sides resized to ``size`` with filter
    ``resample``), "clip" (shorter side to ``size``, centre crop) and "short-edge" (like "resize" but the
    shorter side to ``size``, aspect kept, longer side at most ``max_size``, no crop: (3, H, W) uint8, H and W
    per image).
    """
    kind = spec.get("kind")
    if kind == "squash":
        size = int(spec["size"])
        return lambda img: preprocess(img, size)
    if kind == "clip":
        size = int(spec["size"])
        resample = RESAMPLE[spec["resample"]]
        background = tuple(int(c) for c in spec["background"])
        return lambda img: resize_crop_rgb(img, size, resample, background)
    if kind in ("resize", "short-edge"):
        size = int(spec["size"])
        if spec.get("resample") not in RESAMPLE:
            raise CopyscanError(
                f"unknown resample filter {spec.get('resample')!r} in embedder spec; known: {', '.join(RESAMPLE)}"
            )
        resample = RESAMPLE[spec["resample"]]
        background = tuple(int(c) for c in spec["background"])
        if kind == "short-edge":
            max_size = int(spec["max_size"])
            return lambda img: resize_short_edge_rgb(img, size, max_size, resample, background)
        return lambda img: resize_rgb(img, size, resample, background)
    raise CopyscanError(f"unknown preprocessing kind {kind!r} in embedder spec")


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """PIL image (any mode) → (3, size, size) uint8 RGB.

    Transparency is composited on white; both sides are resized to ``size`` (aspect not kept) with PIL's
    antialiased bicubic filter. 16-bit and float greyscale images are scaled to 8 bits first.
    """
    return resize_rgb(img, size, Image.Resampling.BICUBIC, BACKGROUND_RGB)


def resize_rgb(
    img: Image.Image,
    size: int,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    background: tuple[int, int, int] = BACKGROUND_RGB,
) -> np.ndarray:
    """PIL image (any mode) → (3, size, size) uint8 RGB, both sides resized with ``resample`` (aspect not kept).

    Transparency is composited on ``background``; 16-bit and float greyscale images are scaled to 8 bits first.
    """
    rgb = composite_rgb(_to_8bit(img), background)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale images scaled to 8-bit "L"; other modes unchanged."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return img
    grey = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode != "F" and grey.max() > 255 else 255.0 if img.mode != "F" else 1.0
    return Image.fromarray(np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def short_edge_size(width: int, height: int, size: int, max_size: int) -> tuple[int, int]:
    """(new width, new height) of a ``width`` × ``height`` image whose shorter side is resized to ``size``,
    aspect kept, the longer side capped at ``max_size`` (then the shorter side is below ``size``).

    The arithmetic of torchvision's ``Resize(size, max_size=max_size)`` (SSCD's evaluation transform is
    ``Resize(288)``): the longer side is truncated, ``int(size · long / short)``; when it exceeds
    ``max_size`` the sizes become ``int(max_size · size / long')`` × ``max_size``. Never below 1 pixel.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = max(1, int(max_size * new_short / new_long)), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_short_edge_rgb(
    img: Image.Image,
    size: int,
    max_size: int,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    background: tuple[int, int, int] = BACKGROUND_RGB,
) -> np.ndarray:
    """PIL image (any mode) → (3, H, W) uint8 RGB: shorter side resized to ``size``, aspect kept, longer side
    at most ``max_size`` (``short_edge_size``), no crop; an image already at that size is not resampled.
    Transparency is composited on ``background``; 16-bit and float greyscale images are scaled to 8 bits."""
    rgb = composite_rgb(_to_8bit(img), background)
    new_size = short_edge_size(rgb.size[0], rgb.size[1], size, max_size)
    if rgb.size != new_size:
        rgb = rgb.resize(new_size, resample)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def resize_crop_rgb(
    img: Image.Image,
    size: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    background: tuple[int, int, int] = BACKGROUND_RGB,
) -> np.ndarray:
    """PIL image (any mode) → (3, size, size) uint8 RGB: shorter side resized to ``size`` (aspect kept), then
    the centre ``size`` × ``size`` crop. Transparency is composited on ``background``.

    CLIP's and open_clip's evaluation transform, ``Resize(size)`` then ``CenterCrop(size)`` in torchvision, to
    the pixel: the longer side truncated, ``int(size · long / short)`` (``short_edge_size``), the crop's offset
    ``int(round((side − size) / 2))``."""
    rgb = composite_rgb(_to_8bit(img), background)
    width, height = rgb.size
    new_w, new_h = short_edge_size(width, height, size, max_size=size * max(width, height))  # no cap
    if (new_w, new_h) != rgb.size:
        rgb = rgb.resize((new_w, new_h), resample)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    rgb = rgb.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
