"""Copy augmentations: determinism, the ranges they promise, and where a partial copy lands."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from copyscan.indexing.embed.augment import copy_augment, paste_partial


def _picture(width: int = 240, height: int = 160, seed: int = 0) -> Image.Image:
    """A smooth, structured test picture (gradients plus a few blobs), not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([xx / width * 255, yy / height * 255, 128 + 100 * np.sin(xx / 17 + yy / 23)], axis=-1)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 40)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, size=3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _bytes(img: Image.Image) -> bytes:
    return np.asarray(img).tobytes() + repr(img.size).encode()


def test_copy_augment_is_deterministic_per_seed():
    img = _picture()
    a = copy_augment(img, np.random.default_rng(3))
    b = copy_augment(img, np.random.default_rng(3))
    c = copy_augment(img, np.random.default_rng(4))
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)


def test_copy_augment_ranges():
    img = _picture()
    sizes = []
    for seed in range(20):
        out = copy_augment(img, np.random.default_rng(seed))
        assert out.mode == "RGB" and out.format == "JPEG"
        sizes.append(out.size)
    widths = np.array([w for w, _ in sizes]) / img.width
    heights = np.array([h for _, h in sizes]) / img.height
    # crop 0.6–0.9 of each side times rescale 0.7–1.4 (±1 px of rounding)
    assert widths.min() >= 0.6 * 0.7 - 0.01 and widths.max() <= 0.9 * 1.4 + 0.01
    assert heights.min() >= 0.6 * 0.7 - 0.01 and heights.max() <= 0.9 * 1.4 + 0.01
    # the side ratio changes (independent crops), and the copies are not all the same size
    assert len(set(sizes)) == 20
    assert np.std(widths / heights) > 0.05


def test_copy_augment_keeps_content_but_changes_pixels():
    """The copy still correlates with the matching region of the source, far above an unrelated picture."""
    img = _picture()
    out = copy_augment(img, np.random.default_rng(0))
    small = np.asarray(out.convert("L").resize((32, 32)), dtype=np.float64).ravel()
    best = -1.0
    source = img.convert("L")
    for left in range(0, 100, 8):  # search the crop window roughly
        for top in range(0, 70, 8):
            for fw, fh in [(0.6, 0.6), (0.75, 0.75), (0.9, 0.9), (0.6, 0.9), (0.9, 0.6)]:
                box = (
                    left,
                    top,
                    min(img.width, left + round(fw * img.width)),
                    min(img.height, top + round(fh * img.height)),
                )
                ref = np.asarray(source.crop(box).resize((32, 32)), dtype=np.float64).ravel()
                best = max(best, abs(np.corrcoef(small, ref)[0, 1]))
    other = np.asarray(_picture(seed=9).convert("L").resize((32, 32)), dtype=np.float64).ravel()
    assert best > 0.6
    assert not np.array_equal(np.asarray(out.resize(img.size)), np.asarray(img))
    assert best > abs(np.corrcoef(small, other)[0, 1])


def test_copy_augment_accepts_transparency():
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    rgba.paste(_picture(100, 100), (50, 50))
    out = copy_augment(rgba, np.random.default_rng(1))
    assert out.mode == "RGB"
    assert np.asarray(out)[:5, :5].mean() > 100  # transparent corners became light (white), not black


def test_paste_partial_box_and_content():
    scene = Image.new("RGB", (400, 300), (20, 40, 60))
    obj = Image.new("RGB", (90, 60), (250, 200, 10))
    for seed in range(10):
        out, (left, top, right, bottom) = paste_partial(obj, scene, np.random.default_rng(seed))
        assert out.size == scene.size and out.mode == "RGB"
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        longer = max(right - left, bottom - top)
        assert 0.35 * 300 - 1 <= longer <= 0.5 * 300 + 1
        assert abs((right - left) / (bottom - top) - 1.5) < 0.05  # aspect kept
        pixels = np.asarray(out, dtype=np.int64)
        inside = pixels[top + 3 : bottom - 3, left + 3 : right - 3].reshape(-1, 3).mean(0)
        assert np.abs(inside - [250, 200, 10]).max() < 12
        mask = np.ones(pixels.shape[:2], dtype=bool)
        mask[max(0, top - 3) : bottom + 3, max(0, left - 3) : right + 3] = False
        assert np.abs(pixels[mask].mean(0) - [20, 40, 60]).max() < 6
    a, box_a = paste_partial(obj, scene, np.random.default_rng(5))
    b, box_b = paste_partial(obj, scene, np.random.default_rng(5))
    assert box_a == box_b and _bytes(a) == _bytes(b)


def test_paste_partial_respects_the_object_alpha():
    scene = Image.new("RGB", (300, 300), (0, 0, 255))
    obj = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    obj.paste((255, 0, 0, 255), (25, 25, 75, 75))  # a red square in a transparent frame
    out, (left, top, right, bottom) = paste_partial(obj, scene, np.random.default_rng(0), scale=(0.5, 0.5))
    pixels = np.asarray(out, dtype=np.int64)
    assert right - left == pytest.approx(150, abs=1)
    corner = pixels[top + 2 : top + 20, left + 2 : left + 20].reshape(-1, 3).mean(0)
    centre = pixels[
        (top + bottom) // 2 - 5 : (top + bottom) // 2 + 5, (left + right) // 2 - 5 : (left + right) // 2 + 5
    ]
    assert np.abs(corner - [0, 0, 255]).max() < 15  # the transparent frame shows the scene
    assert np.abs(centre.reshape(-1, 3).mean(0) - [255, 0, 0]).max() < 15
