"""The laion-clip query encoder from an open_clip checkpoint (the ``copyscan[clip]`` extra), beside the TorchScript
tower it always took.

The tests that load open_clip build a tiny ViT CLIP registered with open_clip (nothing is downloaded), save its
weights as .safetensors / .bin / .pt, and compare copyscan's vectors with open_clip's own
``create_model_and_transforms`` pipeline (its eval transform, then ``encode_image``). open_clip imports
torchvision, which has no CPU build for this project's torch, so they are skipped where it does not import and
run where it does (GPU machines with the extra). The rest runs everywhere: the translation of open_clip's
preprocess config into copyscan's spec, CLIP's resize-and-crop arithmetic, the error without open_clip, and the
TorchScript tower.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.clip import CLIP_MEAN, CLIP_STD, clip_spec, open_clip_preprocess
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess, resize_crop_rgb, resize_rgb

SKIP_REASON = (
    "open_clip is not installed here "
    "(the .[clip] extra needs torchvision, which has no CPU build on this machine)"
)
TINY = "copyscan-tiny-vit"  # the open_clip model the tests register
# ViT at CLIP's 224 pixels, 32-pixel patches, 2 blocks of width 32: a few hundred kB of weights
TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
# open_clip's PreprocessCfg defaults: what a checkpoint file of a CLIP model loads with
OPEN_CLIP_DEFAULT = {
    "size": 224,
    "mode": "RGB",
    "mean": CLIP_MEAN,
    "std": CLIP_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def _open_clip_importable() -> bool:
    try:
        import open_clip  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@pytest.fixture
def open_clip():
    try:
        return pytest.importorskip("open_clip", reason=SKIP_REASON)
    except (RuntimeError, OSError) as exc:  # installed, but torchvision's ops were built for another torch
        pytest.skip(f"open_clip is installed but does not import here ({exc.__class__.__name__}: {exc})")


def _images() -> list[Image.Image]:
    """Seeded RGB images of several aspect ratios (odd and even margins around the centre crop), with smooth
    structure as well as noise so resampling differences would show."""
    rng = np.random.default_rng(0)
    out = []
    for width, height in [(224, 224), (448, 336), (301, 517), (640, 229), (180, 200), (999, 1000)]:
        y, x = np.mgrid[0:height, 0:width]
        smooth = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
        noise = rng.integers(0, 56, size=(height, width, 3))
        out.append(Image.fromarray((smooth + noise).astype(np.uint8), "RGB"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Everywhere: the spec of open_clip's preprocessing, CLIP's crop arithmetic, the errors, TorchScript.


def test_open_clip_defaults_give_the_imported_vectors_spec():
    preprocess, normalise = open_clip_preprocess(OPEN_CLIP_DEFAULT)
    spec = clip_spec({"model": "ViT-L-14"}, 768)
    assert preprocess == spec["preprocess"] and normalise == spec["normalise"]
    big, _ = open_clip_preprocess({**OPEN_CLIP_DEFAULT, "size": (336, 336)})
    assert big == clip_spec({"model": "ViT-L-14-336", "size": 336}, 768)["preprocess"]


def test_open_clip_preprocess_kinds_and_filters():
    squash, normalise = open_clip_preprocess(
        {**OPEN_CLIP_DEFAULT, "resize_mode": "squash", "mean": (0.5,) * 3, "std": 0.5}
    )
    assert squash == {
        "kind": "resize",
        "size": 224,
        "resample": "bicubic-antialiased",
        "background": [255] * 3,
    }
    assert normalise == {"mean": [0.5] * 3, "std": [0.5] * 3}
    img = _images()[1]
    assert np.array_equal(make_preprocess(squash)(img), resize_rgb(img, 224, Image.Resampling.BICUBIC))
    bilinear, _ = open_clip_preprocess({**OPEN_CLIP_DEFAULT, "interpolation": "bilinear"})
    assert bilinear["kind"] == "clip" and bilinear["resample"] == "bilinear-antialiased"
    # "random" is for training; open_clip's eval transform runs it as bicubic
    assert open_clip_preprocess({**OPEN_CLIP_DEFAULT, "interpolation": "random"})[0]["resample"] == (
        "bicubic-antialiased"
    )
    # empty fields fall back as open_clip's image_transform does
    assert open_clip_preprocess({"size": 224})[0] == clip_spec({"model": "m"}, 1)["preprocess"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"resize_mode": "longest"}, "resize_mode 'longest'"),
        ({"size": (224, 256)}, r"\(224, 256\)"),
        ({"interpolation": "nearest"}, "interpolation 'nearest'"),
        ({"mode": "L"}, "mode 'L'"),
    ],
)
def test_open_clip_preprocessing_copyscan_cannot_match_is_refused(change, message):
    with pytest.raises(CopyscanError, match=message):
        open_clip_preprocess({**OPEN_CLIP_DEFAULT, **change})


def test_clip_crop_follows_torchvision_resize_and_center_crop():
    """Resize(224) truncates the longer side and CenterCrop rounds the offset: 448 × 336 → 298 × 224, crop at
    x = round(37.0) = 37; 301 × 517 → 224 × 384 (int(384.7)), crop at y = round(80.0) = 80; 640 × 229 →
    626 × 224 (int(626.02)), crop at x = round(201.0); 180 × 200 → 224 × 248 (int(248.9)), y = round(12.0)."""
    images = _images()
    for img, resized, box in [
        (images[1], (298, 224), (37, 0)),
        (images[2], (224, 384), (0, 80)),
        (images[3], (626, 224), (201, 0)),
        (images[4], (224, 248), (0, 12)),
    ]:
        want = img.resize(resized, Image.Resampling.BICUBIC).crop((*box, box[0] + 224, box[1] + 224))
        got = resize_crop_rgb(img, 224, Image.Resampling.BICUBIC)
        assert np.array_equal(got, np.asarray(want).transpose(2, 0, 1))
    # a half-pixel offset rounds as torchvision's int(round(...)): 227 wide, (227 − 224) / 2 = 1.5 → 2
    odd = Image.fromarray(np.arange(227 * 224 * 3, dtype=np.uint32).reshape(224, 227, 3).astype(np.uint8))
    assert np.array_equal(resize_crop_rgb(odd, 224), np.asarray(odd)[:, 2:226].transpose(2, 0, 1))


def test_pretrained_option_is_recorded_only_when_given():
    assert set(clip_spec({"model": "ViT-L-14"}, 768)) == {"name", "model", "preprocess", "normalise", "dim"}
    assert clip_spec({"model": "ViT-L-14", "pretrained": "openai"}, 768)["pretrained"] == "openai"
    with pytest.raises(CopyscanError, match="pretrained"):
        clip_spec({"model": "ViT-L-14", "pretrained": ""}, 768)


@pytest.mark.skipif(
    _open_clip_importable(), reason="open_clip imports here: the error is for machines without"
)
@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "state.pt"])
def test_open_clip_checkpoint_without_open_clip_says_how_to_get_it(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"visual.proj": torch.zeros(2, 2)}, path)  # a state dict, not TorchScript
    else:
        path.write_bytes(b"\0" * 64)
    with pytest.raises(CopyscanError) as err:
        load_embedder("laion-clip", str(path), "cpu", {"model": "ViT-L-14"})
    message = str(err.value)
    assert "pip install 'copyscan[clip]'" in message and "TorchScript" in message and str(path) in message
    assert ("(not TorchScript)" in message) == name.endswith(".pt")


class _Tower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
        self.proj = torch.nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean(dim=(-2, -1)))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("name", ["tower.torchscript.pt", "tower.pth", "tower.ts"])
def test_torchscript_tower_loads_as_before(tmp_path, name):
    torch.manual_seed(0)
    tower = _Tower().eval()
    path = tmp_path / name
    torch.jit.save(torch.jit.script(tower), str(path))
    embedder = load_embedder("laion-clip", str(path), "cpu", {"model": "ViT-L-14"})
    assert embedder.spec == clip_spec({"model": "ViT-L-14"}, 12)
    pixels = np.stack([embedder.preprocess(img) for img in _images()])
    x = (torch.tensor(pixels).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(tower(x), dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed(pixels), want, atol=1e-5)


def test_a_broken_file_of_another_suffix_is_still_a_torchscript_error(tmp_path):
    path = tmp_path / "tower.torchscript"
    path.write_bytes(b"not a zip")
    with pytest.raises(CopyscanError, match="is not a TorchScript file"):
        load_embedder("laion-clip", str(path), "cpu", {"model": "ViT-L-14"})


# ---------------------------------------------------------------------------------------------------------
# Where open_clip imports: a real open_clip model, its weights in a file, against open_clip's own pipeline.


@pytest.fixture
def tiny(open_clip, tmp_path) -> tuple[torch.nn.Module, Path]:
    """(the tiny open_clip model, seeded, in eval mode; the folder its weights files go in)."""
    config = tmp_path / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    return model, tmp_path


def _save(model: torch.nn.Module, path: Path) -> str:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def _reference(open_clip, weights: str, images: list[Image.Image], **kwargs) -> np.ndarray:
    """open_clip's own vectors: create_model_and_transforms with the file, the eval transform, encode_image."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=weights, **kwargs)
    with torch.no_grad():
        x = torch.stack([preprocess(img) for img in images])
        return torch.nn.functional.normalize(model.eval().encode_image(x), dim=-1).numpy()


@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "state.pt"])
def test_open_clip_checkpoint_embeds_as_open_clip_does(open_clip, tiny, name):
    from open_clip.transform import PreprocessCfg

    model, folder = tiny
    weights = _save(model, folder / name)
    embedder = load_embedder("laion-clip", weights, "cpu", {"model": TINY})
    cfg = dataclasses.asdict(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)))
    assert (embedder.spec["preprocess"], embedder.spec["normalise"]) == open_clip_preprocess(cfg)
    # a CLIP model with open_clip's default preprocessing: the spec of imported vectors of the same model
    assert embedder.spec == clip_spec({"model": TINY}, TINY_CONFIG["embed_dim"])
    images = _images()
    got = embedder.embed(np.stack([embedder.preprocess(img) for img in images]))
    np.testing.assert_allclose(got, _reference(open_clip, weights, images), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_open_clip_release_settings_apply(open_clip, tiny, monkeypatch):
    """options pretrained=TAG: the release's quick_gelu and preprocessing, as open_clip gives pretrained=TAG
    (the tiny model has no releases: open_clip's table look-up answers for it here)."""
    model, folder = tiny
    weights = _save(model, folder / "open_clip_model.safetensors")
    release = {"quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"}
    monkeypatch.setattr(
        open_clip, "get_pretrained_cfg", lambda arch, tag: release if tag == "tiny-v1" else {}
    )
    embedder = load_embedder("laion-clip", weights, "cpu", {"model": TINY, "pretrained": "tiny-v1"})
    assert embedder.spec["preprocess"]["kind"] == "resize"
    assert embedder.spec["normalise"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert embedder.spec["pretrained"] == "tiny-v1"
    images = _images()
    got = embedder.embed(np.stack([embedder.preprocess(img) for img in images]))
    kwargs = {"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, "image_resize_mode": "squash"}
    want = _reference(open_clip, weights, images, force_quick_gelu=True, **kwargs)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, _reference(open_clip, weights, images, **kwargs), atol=1e-3)  # GELU differs
    with pytest.raises(CopyscanError, match="no release 'v0'"):
        load_embedder("laion-clip", weights, "cpu", {"model": TINY, "pretrained": "v0"})
    release["resize_mode"] = "longest"
    with pytest.raises(CopyscanError, match="resize_mode 'longest'"):
        load_embedder("laion-clip", weights, "cpu", {"model": TINY, "pretrained": "tiny-v1"})


def test_open_clip_errors_are_copyscan_errors(open_clip, tiny):
    model, folder = tiny
    weights = _save(model, folder / "open_clip_model.safetensors")
    with pytest.raises(CopyscanError, match="no built-in model 'not-a-model'"):
        load_embedder("laion-clip", weights, "cpu", {"model": "not-a-model"})
    with pytest.raises(CopyscanError, match="no built-in model 'hf-hub:"):
        load_embedder("laion-clip", weights, "cpu", {"model": "hf-hub:laion/CLIP-ViT-L-14"})
    with pytest.raises(CopyscanError, match="takes 224-pixel images, but embedder_options size is 336"):
        load_embedder("laion-clip", weights, "cpu", {"model": TINY, "size": 336})
    with pytest.raises(CopyscanError, match="could not load"):  # weights of another architecture
        load_embedder("laion-clip", weights, "cpu", {"model": "ViT-B-32"})
