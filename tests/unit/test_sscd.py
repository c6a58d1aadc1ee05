"""The sscd embedder: loading a TorchScript file by path or URL, preprocessing, normalisation, spec, errors.

The weights are a tiny scripted network with SSCD's contract (float (B, 3, H, W) ImageNet-normalised → (B, d)),
written by the test: no real SSCD file is needed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SIZE = 8

# The test writes its weights with torch.jit.script/save, deprecated in recent torch but how SSCD was released.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(script|save)` is deprecated:DeprecationWarning")


class TinySSCD(torch.nn.Module):
    """conv → ReLU → GeM-like mean pool → linear → L2, like SSCD's trunk + head, in miniature."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return F.normalize(self.fc(y), dim=1)


def save_tiny(path, dim: int = 6, seed: int = 0) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    net = torch.jit.script(TinySSCD(dim).eval())
    torch.jit.save(net, str(path))
    return net


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "sscd_tiny.torchscript.pt"
    net = save_tiny(path)
    return path, net


def test_load_by_path_and_url_embeds_like_by_hand(weights):
    path, net = weights
    by_path = load_embedder("sscd", weights=str(path), device="cpu", options={"size": SIZE})
    by_url = load_embedder("sscd", weights=f"file://{path}", device="cpu", options={"size": SIZE})
    assert by_path.dim == by_url.dim == 6
    assert by_path.image_size == SIZE
    assert by_path.spec == by_url.spec
    assert by_path.spec["normalise"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert by_path.spec["preprocess"]["kind"] == "resize"

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 3, SIZE, SIZE), dtype=np.uint8)
    xb = by_path.embed(pixels)
    assert xb.dtype == np.float32 and xb.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-6)
    with torch.inference_mode():
        x = (torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD
        expected = F.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(xb, expected, atol=1e-6)
    np.testing.assert_allclose(by_url.embed(pixels), expected, atol=1e-6)


def test_default_size_and_dim_from_the_model(tmp_path):
    path = tmp_path / "large.torchscript.pt"
    save_tiny(path, dim=10)
    embedder = load_embedder("sscd", weights=str(path), device="cpu")
    assert embedder.dim == 10 and embedder.image_size == 320
    assert embedder.spec["preprocess"] == {
        "kind": "resize",
        "size": 320,
        "resample": "bilinear-antialiased",
        "background": [255, 255, 255],
    }


def test_preprocess_matches_pil_bilinear_with_alpha_on_white(weights):
    path, _ = weights
    # 3 wide × 2 high, one fully transparent (red) pixel that must become white.
    rgba = np.array(
        [
            [[10, 20, 30, 255], [200, 100, 50, 255], [255, 0, 0, 0]],
            [[0, 0, 0, 255], [90, 180, 45, 255], [5, 250, 125, 255]],
        ],
        dtype=np.uint8,
    )
    img = Image.fromarray(rgba, mode="RGBA")
    flat = rgba[..., :3].copy()
    flat[0, 2] = 255
    for size in (2, 4):
        embedder = load_embedder("sscd", weights=str(path), device="cpu", options={"size": size})
        expected = np.asarray(
            Image.fromarray(flat, mode="RGB").resize((size, size), Image.Resampling.BILINEAR)
        )
        got = embedder.preprocess(img)
        assert got.dtype == np.uint8 and got.shape == (3, size, size)
        np.testing.assert_array_equal(got, expected.transpose(2, 0, 1))
        # Decode workers rebuild the preprocessing from the spec alone.
        np.testing.assert_array_equal(make_preprocess(embedder.spec["preprocess"])(img), got)

    # Half-transparent pixels are blended with white (PIL rounds: allow 1), and a same-size image is not resampled.
    half = Image.fromarray(np.array([[[0, 0, 0, 128], [100, 50, 200, 255]]] * 2, dtype=np.uint8), mode="RGBA")
    got = make_preprocess(
        {"kind": "resize", "size": 2, "resample": "bilinear-antialiased", "background": [255] * 3}
    )(half)
    assert abs(int(got[0, 0, 0]) - round(255 * (1 - 128 / 255))) <= 1
    np.testing.assert_array_equal(got[:, :, 1], [[100, 100], [50, 50], [200, 200]])


def test_missing_or_bad_weights_and_options(tmp_path, weights):
    path, _ = weights
    with pytest.raises(CopyscanError, match="SSCD TorchScript"):
        load_embedder("sscd", device="cpu")
    with pytest.raises(CopyscanError, match="does not exist"):
        load_embedder("sscd", weights=str(tmp_path / "absent.pt"), device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(CopyscanError, match="not a TorchScript file"):
        load_embedder("sscd", weights=str(junk), device="cpu")
    with pytest.raises(CopyscanError, match="unknown sscd options"):
        load_embedder("sscd", weights=str(path), device="cpu", options={"p": 3})
    with pytest.raises(CopyscanError, match="positive integer"):
        load_embedder("sscd", weights=str(path), device="cpu", options={"size": 0})
    with pytest.raises(CopyscanError, match="resample"):
        make_preprocess({"kind": "resize", "size": 4, "resample": "nearest", "background": [255] * 3})


def test_model_with_wrong_output_contract_is_refused(tmp_path):
    path = tmp_path / "classifier.torchscript.pt"
    torch.jit.save(
        torch.jit.script(torch.nn.Conv2d(3, 2, kernel_size=1)), str(path)
    )  # (B, 2, H, W), not (B, d)
    with pytest.raises(CopyscanError, match=r"expected \(2, d\)"):
        load_embedder("sscd", weights=str(path), device="cpu", options={"size": SIZE})


def test_fingerprint_follows_the_weights_and_size(weights):
    path, _ = weights
    first = load_embedder("sscd", weights=str(path), device="cpu", options={"size": SIZE})
    other_size = load_embedder("sscd", weights=str(path), device="cpu", options={"size": 2 * SIZE})
    assert other_size.fingerprint != first.fingerprint

    save_tiny(path, seed=1)  # same name, other weights
    stat = os.stat(path)
    # The digest is cached by (path, mtime): make sure the rewrite shows even on a coarse-mtime filesystem.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    second = load_embedder("sscd", weights=str(path), device="cpu", options={"size": SIZE})
    assert second.spec["weights_sha256"] != first.spec["weights_sha256"]
    assert second.fingerprint != first.fingerprint


def test_unknown_embedder_lists_sscd():
    with pytest.raises(CopyscanError, match="sscd"):
        load_embedder("nope")
