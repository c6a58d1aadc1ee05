"""The sscd embedder's ``resize=short_edge`` mode: the paper's evaluation preprocessing (shorter side to 288,
aspect kept, no crop), images of different shapes embedded one shape group at a time, spec and guard rails.

The weights are small scripted networks written by the test (conv → global mean pool → linear → L2, which
takes any H × W), as in test_sscd.py: no real SSCD file is needed.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_sscd import TinySSCD  # conv → ReLU → mean pool → linear → L2: takes any H, W

from copyscan.indexing.embed.decode import PairSpec, decode_samples
from copyscan.indexing.embed.stage import embed_shard
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import sscd
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess, short_edge_size
from copyscan.indexing.models.regions import RegionSpec
from copyscan.indexing.read.reader import Sample
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import check_embedder

MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
SIZE = 16  # small inputs keep the forward passes cheap on CPU; 288 is checked on preprocessing only

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:DeprecationWarning")


class Flatten(torch.nn.Module):
    """The normalised input itself, flattened: (B, 3, H, W) → (B, 3·H·W), to read what the model is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class SquareOnly(torch.nn.Module):
    """A model with a fixed input size (a linear layer on the flattened SIZE × SIZE image)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * SIZE * SIZE, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x.flatten(1)), dim=1)


def _save(module: torch.nn.Module, path, seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    net = torch.jit.script(module.eval())
    torch.jit.save(net, str(path))
    return net


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "sscd_any_shape.torchscript.pt"
    return path, _save(TinySSCD(6), path)


def _sscd(path, **options):
    return load_embedder("sscd", weights=str(path), device="cpu", options=options)


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode=mode)


def _alone(net: torch.jit.ScriptModule, image: np.ndarray) -> np.ndarray:
    """The vector of one (3, H, W) uint8 image, by hand: ImageNet normalisation, the network, batch 1."""
    x = torch.from_numpy(((image / 255.0 - MEAN) / STD).astype(np.float32))[None]
    with torch.inference_mode():
        return F.normalize(net(x), dim=1)[0].numpy()


def test_short_edge_size_follows_torchvision_resize_arithmetic():
    # (width, height) → (new width, new height); the longer side truncated: int(288 · long / short)
    assert short_edge_size(300, 600, 288, 1152) == (288, 576)
    assert short_edge_size(600, 300, 288, 1152) == (576, 288)
    assert short_edge_size(333, 500, 288, 1152) == (288, 432)  # 432.43 → 432
    assert short_edge_size(500, 333, 288, 1152) == (432, 288)
    assert short_edge_size(288, 400, 288, 1152) == (288, 400)  # already there: unchanged
    assert short_edge_size(100, 50, 288, 1152) == (576, 288)  # small images are enlarged, as in the paper
    assert short_edge_size(400, 400, 288, 1152) == (288, 288)
    assert short_edge_size(1152, 288, 288, 1152) == (1152, 288)  # 4:1 is exact at the default cap
    # longer than the cap: long side = max_size, short side int(max_size · 288 / long') (torchvision's rule)
    assert short_edge_size(2000, 100, 288, 1152) == (1152, 57)  # 5760 > 1152: int(1152 · 288 / 5760) = 57
    assert short_edge_size(20, 10000, 288, 1152) == (2, 1152)
    assert short_edge_size(1_000_000, 8, 288, 1152) == (1152, 1)  # never 0 pixels


def test_preprocess_is_pil_bilinear_short_edge_then_imagenet_normalisation(tmp_path):
    path = tmp_path / "flatten.torchscript.pt"
    _save(Flatten(), path)
    embedder = _sscd(path, resize="short_edge")
    assert embedder.spec["preprocess"] == {
        "kind": "short-edge",
        "size": 288,
        "max_size": 1152,
        "resample": "bilinear-antialiased",
        "background": [255, 255, 255],
    }
    for (width, height), shape in {(300, 600): (3, 576, 288), (600, 300): (3, 288, 576)}.items():
        img = _image(width, height, seed=width)
        got = embedder.preprocess(img)
        assert got.dtype == np.uint8 and got.shape == shape
        expected = np.asarray(img.resize((got.shape[2], got.shape[1]), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(got, expected.transpose(2, 0, 1))
        # decode workers rebuild it from the spec alone
        np.testing.assert_array_equal(make_preprocess(embedder.spec["preprocess"])(img), got)

        # What the network receives: (x / 255 − mean) / std of those pixels, computed here by hand (both
        # sides unit-normalised in float64: the module's float32 L2 over 500k values is only good to ~1e-4).
        by_hand = ((expected.transpose(2, 0, 1) / 255.0 - MEAN) / STD).ravel()
        np.testing.assert_allclose(_seen(embedder, got), _unit(by_hand), rtol=1e-5, atol=1e-9)

    # A flat colour stays flat through the resize: every input value is exactly (c / 255 − mean) / std.
    flat = Image.new("RGB", (300, 600), (10, 128, 250))
    got = embedder.preprocess(flat)
    assert got.shape == (3, 576, 288) and (got == np.array([10, 128, 250]).reshape(3, 1, 1)).all()
    value = (np.array([10, 128, 250]).reshape(3, 1, 1) / 255.0 - MEAN) / STD  # -1.9467, 0.2052, 2.5529
    np.testing.assert_allclose(
        _seen(embedder, got), _unit(np.broadcast_to(value, (3, 576, 288)).ravel()), rtol=1e-5
    )

    # Transparency on white, aspect kept, no crop.
    rgba = _image(60, 40, seed=3, mode="RGBA")
    got = embedder.preprocess(rgba)
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.getchannel("A"))
    np.testing.assert_array_equal(
        got, np.asarray(white.resize((432, 288), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    )


def _seen(embedder, pixels: np.ndarray) -> np.ndarray:
    """The (flattened) input the network got for one (3, H, W) uint8 image, rescaled to unit norm in float64."""
    with torch.inference_mode():
        return _unit(embedder.module(torch.from_numpy(pixels)[None])[0].numpy().astype(np.float64))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def test_images_of_different_shapes_get_their_batch_1_vectors(weights, monkeypatch):
    path, net = weights
    embedder = _sscd(path, resize="short_edge", size=SIZE)
    assert embedder.spec["preprocess"]["max_size"] == 4 * SIZE and embedder.dim == 6
    sizes = [(30, 60), (64, 32), (30, 60), (16, 16), (300, 20), (45, 30), (64, 32), (20, 21)]
    images = [embedder.preprocess(_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    assert [im.shape[1:] for im in images] == [
        (32, 16), (16, 32), (32, 16), (16, 16), (4, 64), (16, 24), (16, 32), (16, 16),
    ]  # fmt: skip
    expected = np.stack([_alone(net, im) for im in images])

    xb = embedder.embed(images)
    assert xb.dtype == np.float32 and xb.shape == (8, 6)
    np.testing.assert_allclose(xb, expected, atol=1e-6)
    # passes of one image each (a tiny pixel budget) give the same vectors
    monkeypatch.setattr(sscd, "GROUP_PIXELS", 1)
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-6)
    # a batch whose images happen to share a shape arrives stacked
    same = np.stack([images[0], images[2]])
    np.testing.assert_allclose(embedder.embed(same), expected[[0, 2]], atol=1e-6)
    assert embedder.embed([]).shape == (0, 6)

    # the fixed-size mode refuses images of different shapes clearly
    square = _sscd(path, size=SIZE)
    with pytest.raises(CopyscanError, match="fixed-size batches"):
        square.embed(images)


def test_shape_groups_keep_order_and_split_by_pixels():
    shapes = [(3, 4, 8), (3, 8, 4), (3, 4, 8), (3, 4, 8), (3, 8, 4)]
    assert sscd.shape_groups(shapes) == [[0, 2, 3], [1, 4]]
    assert sscd.shape_groups(shapes, max_pixels=64) == [[0, 2], [3], [1, 4]]
    assert sscd.shape_groups(shapes, max_pixels=1) == [[0], [2], [3], [1], [4]]
    assert sscd.shape_groups([]) == []


def test_decode_emits_each_image_at_its_own_shape(weights):
    path, _ = weights
    embedder = _sscd(path, resize="short_edge", size=SIZE)
    samples = [
        Sample(f"k{i}", _png(_image(w, h, seed=i)), "png")
        for i, (w, h) in enumerate([(30, 60), (64, 32), (40, 40)])
    ]
    samples.append(Sample("junk", b"not an image", "png"))
    mixed, same = decode_samples(
        samples + samples[:2], embedder.preprocess, batch_size=3, image_size=SIZE, pairs=PairSpec(images=2)
    )
    assert isinstance(mixed.pixels, list) and [p.shape for p in mixed.pixels] == [
        (3, 32, 16), (3, 16, 32), (3, 16, 16),
    ]  # fmt: skip
    assert [r["width"] for r in mixed.records] == [30, 64, 40]
    assert [r["reason"] for r in same.rejections] == ["not_an_image"]
    # the next batch's two images happen to have different shapes too; pairs keep the copies' own shapes
    assert len(same.pixels) == 2 and mixed.pair_rows.tolist() == [0, 0, 1, 1]
    assert len(mixed.pair_pixels) == 4 and all(p.ndim == 3 for p in mixed.pair_pixels)
    # one shape throughout: a plain (n, 3, H, W) array, as in the fixed-size mode
    (uniform,) = decode_samples(samples[:1] * 3, embedder.preprocess, batch_size=8, image_size=SIZE)
    assert isinstance(uniform.pixels, np.ndarray) and uniform.pixels.shape == (3, 3, 32, 16)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_embed_shard_end_to_end(tmp_path, weights):
    """Tar shard → decode → embed → outputs, through ``embed_shard`` (the pipeline's in-process path)."""
    path, net = weights
    embedder = _sscd(path, resize="short_edge", size=SIZE)
    sizes = [(30, 60), (64, 32), (30, 60), (40, 40), (5000, 10), (33, 50), (16, 16)]
    pictures = [_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    members = [(f"{i:09d}.png", _png(img)) for i, img in enumerate(pictures)]
    members.insert(3, ("000000099.png", b"<html>not an image</html>"))
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    out = str(tmp_path / "out")
    stats = embed_shard(out, 0, str(shard), embedder, batch_size=3)
    assert stats["count"] == 7 and stats["rejected_by_reason"] == {"not_an_image": 1}
    assert stats["embedder_fingerprint"] == embedder.fingerprint
    xb = storage.load_npy(layout.emb_url(out, 0)).astype(np.float32)  # stored as float16
    expected = np.stack([_alone(net, embedder.preprocess(img)) for img in pictures])
    np.testing.assert_allclose(xb, expected, atol=2e-3)
    assert embedder.preprocess(pictures[4]).shape == (3, 1, 64)  # 5000 × 10 capped at 4 × SIZE

    # regions are cut from fixed-size images: refused before anything is decoded
    with pytest.raises(CopyscanError, match="resize=short_edge"):
        embed_shard(out, 1, str(shard), embedder, batch_size=3, regions=RegionSpec(((0, 0, 1, 1),)))
    assert RegionSpec(((0, 0, 1, 1),), mode="pool").preprocess_spec(embedder.spec["preprocess"]) is None


def test_options_spec_and_index_check(tmp_path, weights):
    path, _ = weights
    default = _sscd(path, size=SIZE)
    square = _sscd(path, size=SIZE, resize="square")
    assert square.spec == default.spec and "max_size" not in default.spec["preprocess"]
    short = _sscd(path, resize="short_edge", size=SIZE)
    capped = _sscd(path, resize="short_edge", size=SIZE, max_size=40)
    assert short.image_size == SIZE and capped.spec["preprocess"]["max_size"] == 40
    assert len({default.fingerprint, short.fingerprint, capped.fingerprint}) == 3

    # a scan refuses an index built in the other mode, naming the preprocessing
    manifest = {"embedder": default.spec, "embedder_fingerprint": default.fingerprint}
    check_embedder(manifest, square.spec)
    with pytest.raises(CopyscanError, match="preprocess: index .*'resize'.* vs query .*'short-edge'"):
        check_embedder(manifest, short.spec)
    with pytest.raises(CopyscanError, match="max_size"):
        check_embedder({"embedder": short.spec, "embedder_fingerprint": short.fingerprint}, capped.spec)

    bad = [
        ({"resize": "short-edge"}, "resize must be square .* or short_edge"),
        ({"resize": True}, "resize must be"),
        ({"resize": "square", "max_size": 1000}, "max_size caps the longer side with resize=short_edge"),
        ({"max_size": 1000}, "max_size caps"),
        ({"resize": "short_edge", "max_size": 288}, r"above size=288"),
        ({"resize": "short_edge", "size": 64, "max_size": 32}, r"above size=64"),
        ({"resize": "short_edge", "max_size": True}, "max_size"),
        ({"resize": "short_edge", "max_size": "1e4"}, "max_size"),
        ({"resize": "short_edge", "size": 0}, "positive integer"),
        ({"resize": "short_edge", "max_pixels": 10}, "unknown sscd options"),
    ]
    for options, message in bad:
        with pytest.raises(CopyscanError, match=message):
            load_embedder("sscd", weights=str(path), device="cpu", options=options)

    # a model that only takes square inputs is refused at load time in this mode, not in an actor
    fixed = tmp_path / "square_only.torchscript.pt"
    _save(SquareOnly(), fixed)
    _sscd(fixed, size=SIZE)
    with pytest.raises(CopyscanError, match=rf"failed on a \(2, 3, {SIZE}, {SIZE * 3 // 2}\) batch"):
        _sscd(fixed, resize="short_edge", size=SIZE)
