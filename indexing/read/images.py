"""Image modes: transparency composited on a background, files opened as the descriptor sees them."""

from __future__ import annotations

import os

from PIL import Image


def composite_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB image with any transparency composited on ``background``."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, transparency composited on white (as the descriptor's preprocessing does)."""
    with Image.open(path) as img:
        img.load()
        return composite_rgb(img)
