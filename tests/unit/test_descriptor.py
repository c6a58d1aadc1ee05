"""Copy descriptor: preprocessing against hand-computed pixels, pooling, invariance, post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.embed.augment import copy_augment
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import descriptor, effnet
from copyscan.indexing.models.preprocess import preprocess
from copyscan.indexing.read.images import open_rgb
from copyscan.jobs.demo import sample_images

SKIMAGE_DATA = "usr/lib/python3/dist-packages/skimage/data"
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png", "color.png")


@pytest.fixture(scope="module")
def backbone() -> effnet.EfficientNetLite0:
    return effnet.load_efficientnet_lite0()


# ---------------------------------------------------------------------------------------------------------
# preprocess


def test_preprocess_layout_and_exact_pixels():
    pixels = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    out = preprocess(Image.fromarray(pixels, "RGB"), 2)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 2)
    np.testing.assert_array_equal(out[0], [[255, 0], [0, 10]])  # R plane
    np.testing.assert_array_equal(out[1], [[0, 255], [0, 20]])
    np.testing.assert_array_equal(out[2], [[0, 0], [255, 30]])


def test_preprocess_composites_alpha_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (0, 0, 0, 0)  # fully transparent → white
    # half-covered blue over white: 255·(1 − 128/255) ≈ 127, and 200·128/255 + 127
    rgba[2:] = (0, 0, 200, 128)
    out = preprocess(Image.fromarray(rgba, "RGBA"), 4)
    np.testing.assert_array_equal(out[:, :2], 255)
    np.testing.assert_allclose(out[0, 2:], 127, atol=1)
    np.testing.assert_allclose(out[2, 2:], 127 + 200 * 128 / 255, atol=1)


def test_preprocess_squashes_without_cropping():
    """A 64×32 image whose left half is red and right half blue becomes 16×16 with the same halves (no centre
    crop, aspect not kept); away from the seam the antialiased filter returns the exact colours."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = (200, 0, 0)
    pixels[:, 32:] = (0, 0, 150)
    out = preprocess(Image.fromarray(pixels, "RGB"), 16)
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(
        out[:, :, :6], np.broadcast_to(np.array([200, 0, 0])[:, None, None], (3, 16, 6))
    )
    np.testing.assert_array_equal(
        out[:, :, 10:], np.broadcast_to(np.array([0, 0, 150])[:, None, None], (3, 16, 6))
    )


def test_preprocess_grey_and_16_bit():
    grey = preprocess(Image.fromarray(np.full((8, 8), 77, dtype=np.uint8), "L"), 8)
    np.testing.assert_array_equal(grey, 77)
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    np.testing.assert_array_equal(preprocess(deep, 8), 255)


# ---------------------------------------------------------------------------------------------------------
# pooling and the module


def test_gem_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    assert descriptor.gem(x, 1.0).item() == pytest.approx(2.5)
    assert descriptor.gem(x, 3.0).item() == pytest.approx(25.0 ** (1 / 3), rel=1e-5)  # ((1+8+27+64)/4)^(1/3)
    assert descriptor.gem(x, 60.0).item() == pytest.approx(4.0, rel=0.03)  # → max pooling
    assert descriptor.gem(-x, 3.0).item() == pytest.approx(1e-6, rel=1e-3)  # clamped


def test_rmac_regions_by_hand():
    assert descriptor.rmac_regions(7, 7, 0) == [(0, 0, 7, 7)]
    assert descriptor.rmac_regions(7, 7, 1) == [
        (0, 0, 7, 7),
        (0, 0, 5, 5),
        (0, 2, 5, 5),
        (2, 0, 5, 5),
        (2, 2, 5, 5),
    ]
    assert len(descriptor.rmac_regions(10, 10, 2)) == 1 + 4 + 9


def test_descriptor_outputs_unit_vectors_and_a_json_spec(backbone):
    model = descriptor.CopyDescriptor(backbone, size=64, layers=("block15", "block10"), regions=1)
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    assert y.dtype == torch.float32 and y.shape == (3, model.dim) and model.dim == 320 + 112
    torch.testing.assert_close(y.norm(dim=1), torch.ones(3))
    spec = json.loads(json.dumps(model.spec()))
    assert spec["preprocess"] == {
        "kind": "squash",
        "size": 64,
        "resample": "bicubic-antialiased",
        "background": [255] * 3,
    }
    assert spec["dim"] == model.dim and spec["layers"] == ["block15", "block10"]
    with pytest.raises(CopyscanError):
        model(x.float())
    with pytest.raises(CopyscanError):
        descriptor.CopyDescriptor(backbone, layers=("fc",))


def test_default_descriptor_matches_a_reference_on_the_unfused_backbone(backbone):
    """BN folding and CPU chunking change nothing but rounding: the default options recomputed by hand
    (per-image standardisation, ImageNet normalisation, GeM over the whole map plus R-MAC regions per layer)."""
    opts = descriptor.DEFAULT_OPTIONS
    model = descriptor.CopyDescriptor(backbone, size=64, cpu_chunk=2)
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(descriptor.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(descriptor.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        xf = x.double() / 255
        if opts["pixel_norm"] == "instance":
            m, s = descriptor.INSTANCE_MEAN_STD
            flat = xf.flatten(1)
            xf = (xf - flat.mean(1).view(-1, 1, 1, 1)) / flat.std(1).view(-1, 1, 1, 1) * s + m
        xf = ((xf - mean) / std).float()
        taps = tuple(descriptor.LAYERS[n] for n in opts["layers"] if descriptor.LAYERS[n] is not None)
        tapped, head = backbone.forward_stages(xf, taps)
        maps = dict(zip(taps, tapped, strict=True))
        parts = []
        for name in opts["layers"]:
            fmap = head if descriptor.LAYERS[name] is None else maps[descriptor.LAYERS[name]]
            h, w = fmap.shape[-2:]
            regions = descriptor.rmac_regions(h, w, opts["regions"]) if opts["regions"] else [(0, 0, h, w)]
            vec = sum(
                F.normalize(descriptor.gem(fmap[:, :, t : t + rh, c : c + rw], opts["p"]), dim=1)
                for t, c, rh, rw in regions
            )
            parts.append(F.normalize(vec, dim=1))
        expected = F.normalize(torch.cat(parts, dim=1), dim=1)
        assert tuple(opts["scales"]) == (1.0,)
        torch.testing.assert_close(model(x), expected, atol=2e-4, rtol=1e-3)


def test_instance_normalisation_removes_brightness_and_contrast(backbone):
    model = descriptor.CopyDescriptor(backbone, size=64, pixel_norm="instance")
    x = torch.randint(60, 190, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    changed = (x.float() * 1.3 - 40).round().clamp(0, 255).to(torch.uint8)  # no clipping in this range
    torch.testing.assert_close(model.normalise(changed), model.normalise(x), atol=0.03, rtol=0)
    imagenet = descriptor.CopyDescriptor(backbone, size=64, pixel_norm="imagenet")
    assert (imagenet.normalise(changed) - imagenet.normalise(x)).abs().max() > 0.3
    with pytest.raises(CopyscanError):
        descriptor.CopyDescriptor(backbone, pixel_norm="none")


def _photos() -> list[Image.Image]:
    images = []
    for name in PHOTOS:
        try:
            path = sample_images.package_file("python3-skimage", f"{SKIMAGE_DATA}/{name}")
        except CopyscanError as error:
            pytest.skip(
                f"scikit-image's sample photos (Debian package python3-skimage) not available: {error}"
            )
        images.append(open_rgb(path))
    return images


def test_augmented_copy_is_nearest_to_its_source(backbone):
    """Six real photos; a copy_augment-ed copy of each must be closer to its source than to any other photo,
    with a clear margin."""
    model = descriptor.CopyDescriptor(backbone)
    photos = _photos()
    rng = np.random.default_rng(7)
    copies = [copy_augment(img, rng) for img in photos]
    size = model.size
    with torch.inference_mode():
        xb = model(torch.from_numpy(np.stack([preprocess(i, size) for i in photos]))).numpy()
        xq = model(torch.from_numpy(np.stack([preprocess(i, size) for i in copies]))).numpy()
    sims = xq @ xb.T
    np.testing.assert_array_equal(sims.argmax(1), np.arange(len(photos)))
    others = np.where(np.eye(len(photos), dtype=bool), -np.inf, sims).max(1)
    assert (np.diag(sims) - others).min() > 0.05, sims.round(3)
