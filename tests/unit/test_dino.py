"""The dino-vitb16 embedder and ``copyscan.indexing.models.vit``: official key layout, loading, the maths,
preprocessing, errors.

The weights are a seeded random ViT-B/16 written by the test (built once per module: about 3 s on 2 CPUs); no
real DINO file is needed. Full-size forwards run on one image only; the maths is checked on tiny variants
against a hand-written transformer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models import vit
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SMALL = 32  # a 2 × 2 patch grid: cheap full-size forwards (position embeddings interpolated from 14 × 14)


def official_vitb16_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of DINO's ``vit_base(patch_size=16)`` state dict (num_classes=0: no head), with its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
    }
    for i in range(12):
        shapes |= {
            f"blocks.{i}.norm1.weight": (768,),
            f"blocks.{i}.norm1.bias": (768,),
            f"blocks.{i}.attn.qkv.weight": (2304, 768),
            f"blocks.{i}.attn.qkv.bias": (2304,),
            f"blocks.{i}.attn.proj.weight": (768, 768),
            f"blocks.{i}.attn.proj.bias": (768,),
            f"blocks.{i}.norm2.weight": (768,),
            f"blocks.{i}.norm2.bias": (768,),
            f"blocks.{i}.mlp.fc1.weight": (3072, 768),
            f"blocks.{i}.mlp.fc1.bias": (3072,),
            f"blocks.{i}.mlp.fc2.weight": (768, 3072),
            f"blocks.{i}.mlp.fc2.bias": (768,),
        }
    return shapes | {"norm.weight": (768,), "norm.bias": (768,)}


@pytest.fixture(scope="module")
def vitb16():
    torch.manual_seed(0)
    return vit.vit_base_patch16().eval()


@pytest.fixture(scope="module")
def weights(vitb16, tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase16_pretrain.pth"
    torch.save(vitb16.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def embedder(weights):
    return load_embedder("dino-vitb16", weights=str(weights), device="cpu")


def reference(model: vit.VisionTransformer, pixels: np.ndarray) -> torch.Tensor:
    """The model's tokens (B, 1 + h*w, dim) on uint8 pixels, normalised by hand."""
    with torch.inference_mode():
        return model.forward_tokens((torch.from_numpy(pixels).float() / 255.0 - MEAN) / STD)


def test_vitb16_has_the_official_keys_shapes_and_size(vitb16):
    got = {k: tuple(v.shape) for k, v in vitb16.state_dict().items()}
    assert got == official_vitb16_shapes()
    assert got["pos_embed"] == (1, 197, 768)
    assert got["blocks.11.attn.qkv.weight"] == (2304, 768)
    assert got["patch_embed.proj.weight"] == (768, 3, 16, 16)
    # patch 590,592 + cls 768 + pos 151,296 + 12 blocks × 7,087,872 + final norm 1,536
    assert sum(p.numel() for p in vitb16.parameters()) == 85_798_656
    norms = [m for m in vitb16.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 25 and all(m.eps == 1e-6 for m in norms)
    assert all(m.approximate == "none" for m in vitb16.modules() if isinstance(m, torch.nn.GELU))
    assert not list(vitb16.buffers())


def test_spec(embedder):
    assert embedder.dim == 768 and embedder.image_size == 224
    spec = embedder.spec
    assert spec["name"] == "dino-vitb16" and len(spec["weights_sha256"]) == 64
    assert spec["preprocess"] == {
        "kind": "resize",
        "size": 224,
        "resample": "bicubic-antialiased",
        "background": [255, 255, 255],
    }
    assert spec["normalise"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert spec["global"] == "cls" and spec["patch_size"] == 16


def test_tokens_match_the_model_at_224(embedder, vitb16):
    pixels = np.random.default_rng(0).integers(0, 256, size=(1, 3, 224, 224), dtype=np.uint8)
    tokens = embedder.tokens(pixels)
    assert tokens.dtype == np.float32 and tokens.shape == (1, 196, 768)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)
    expected = F.normalize(reference(vitb16, pixels)[:, 1:], dim=-1).numpy()
    np.testing.assert_allclose(tokens, expected, atol=1e-5)


def test_embed_is_the_unit_norm_cls(embedder, vitb16):
    # Small inputs keep this cheap; they also go through the position-embedding interpolation.
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 3, SMALL, SMALL), dtype=np.uint8)
    xb = embedder.embed(pixels)
    assert xb.dtype == np.float32 and xb.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-6)
    expected = F.normalize(reference(vitb16, pixels)[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(xb, expected, atol=1e-5)
    assert embedder.tokens(pixels).shape == (3, 4, 768)


def test_load_by_url_at_288_interpolates_the_position_embeddings(embedder, weights, vitb16):
    by_url = load_embedder("dino-vitb16", weights=f"file://{weights}", device="cpu", options={"size": 288})
    assert by_url.image_size == 288 and by_url.spec["preprocess"]["size"] == 288
    assert by_url.spec | {"preprocess": embedder.spec["preprocess"]} == embedder.spec
    assert by_url.fingerprint != embedder.fingerprint
    for name, value in by_url.module.vit.state_dict().items():
        assert torch.equal(value, vitb16.state_dict()[name]), name

    pixels = np.random.default_rng(2).integers(0, 256, size=(1, 3, 288, 288), dtype=np.uint8)
    tokens = by_url.tokens(pixels)
    assert tokens.shape == (1, 324, 768) and np.isfinite(tokens).all()
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)


def test_wrapped_checkpoints_unwrap(vitb16):
    state = vitb16.state_dict()
    # DINO's training checkpoint: multi-crop wrapper ("backbone." + the projection head), student under DDP.
    training = {
        "teacher": {"backbone." + k: v for k, v in state.items()}
        | {"head.last_layer.weight_g": torch.ones(1)},
        "student": {"module.backbone." + k: torch.zeros_like(v) for k, v in state.items()},
        "epoch": 100,
    }
    for checkpoint in (
        state,
        training,
        {"model": {"module." + k: v for k, v in state.items()}},
        {"state_dict": state},
        {"student": {"module.backbone." + k: v for k, v in state.items()}},
    ):
        unwrapped = vit.unwrap_state_dict(checkpoint)
        assert unwrapped.keys() == state.keys()
        assert all(unwrapped[k] is state[k] for k in state)  # the teacher's, not the student's zeros
    # Loading a wrapped file end to end: test_load_weights_strict_on_a_meta_model (tiny, same code path).


def test_mismatched_state_dicts_are_refused_clearly(tmp_path, vitb16):
    state = dict(vitb16.state_dict())
    del state["blocks.3.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(10, 768)
    with torch.device("meta"):
        target = vit.vit_base_patch16()
    with pytest.raises(
        CopyscanError,
        match=r"x\.pth does not match DINO's ViT \(patch 16, dim 768, depth 12\): "
        r"missing \(1\): blocks\.3\.mlp\.fc2\.bias; unexpected \(1\): head\.weight\.",
    ):
        vit.load_weights(target, state, "x.pth")

    # Through the embedder: a ViT-S/16 (384-d) file is not a ViT-B/16; every tensor has the wrong shape.
    with torch.device("meta"):
        small = vit.VisionTransformer(patch_size=16, dim=384, depth=12, num_heads=6)
    other = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in small.state_dict().items()}, other)
    with pytest.raises(
        CopyscanError, match=r"wrong shape \(150\): cls_token \(1, 1, 384\) \(expected \(1, 1, 768\)\)"
    ):
        load_embedder("dino-vitb16", weights=str(other), device="cpu")

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CopyscanError, match="not a loadable torch state dict"):
        load_embedder("dino-vitb16", weights=str(junk), device="cpu")
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(CopyscanError, match="not a state dict"):
        load_embedder("dino-vitb16", weights=str(listed), device="cpu")


def test_missing_weights_and_bad_options(tmp_path, weights):
    with pytest.raises(CopyscanError, match="dino_vitbase16_pretrain.pth"):
        load_embedder("dino-vitb16", device="cpu")
    with pytest.raises(CopyscanError, match="does not exist"):
        load_embedder("dino-vitb16", weights=str(tmp_path / "absent.pth"), device="cpu")
    with pytest.raises(CopyscanError, match="unknown dino-vitb16 options"):
        load_embedder("dino-vitb16", weights=str(weights), device="cpu", options={"pool": "gem"})
    for size in (0, 100, True, "224"):
        with pytest.raises(CopyscanError, match="multiple of 16"):
            load_embedder("dino-vitb16", weights=str(weights), device="cpu", options={"size": size})
    with pytest.raises(CopyscanError, match="dino-vitb16"):
        load_embedder("nope")


def test_preprocess_matches_pil_bicubic_with_alpha_on_white(embedder):
    rgba = np.random.default_rng(3).integers(0, 256, size=(150, 300, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0  # fully transparent: white
    img = Image.fromarray(rgba, mode="RGBA")
    flat = rgba[..., :3].copy()
    flat[:10, :10] = 255
    expected = np.asarray(Image.fromarray(flat, mode="RGB").resize((224, 224), Image.Resampling.BICUBIC))
    got = embedder.preprocess(img)
    assert got.dtype == np.uint8 and got.shape == (3, 224, 224)
    np.testing.assert_array_equal(got, expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(make_preprocess(embedder.spec["preprocess"])(img), got)


# ---------------------------------------------------------------------------------------------------------
# The maths, on tiny variants, against a transformer written out by hand (DINO's code, unfused).


def tiny(seed: int = 0, **kwargs) -> vit.VisionTransformer:
    torch.manual_seed(seed)
    model = vit.VisionTransformer(
        **({"img_size": 16, "patch_size": 4, "dim": 12, "depth": 2, "num_heads": 3} | kwargs)
    )
    with torch.no_grad():  # LayerNorms away from the identity, so the test sees their parameters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * weight + bias


def hand_block(x: torch.Tensor, sd: dict[str, torch.Tensor], i: int, heads: int) -> torch.Tensor:
    p = f"blocks.{i}."
    B, N, C = x.shape
    y = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
    q, k, v = (
        qkv[..., j * C : (j + 1) * C].reshape(B, N, heads, C // heads).transpose(1, 2) for j in range(3)
    )
    attn = torch.softmax(q @ k.transpose(-2, -1) * (C // heads) ** -0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    y = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    y = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
    y = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))  # exact GELU
    return x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def dino_interpolate(pos_embed: torch.Tensor, patch: int, w: int, h: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` verbatim in substance (its ``w`` is the input's height)."""
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = F.interpolate(
        pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def hand_tokens(model: vit.VisionTransformer, x: torch.Tensor, heads: int) -> torch.Tensor:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    B, _, H, W = x.shape
    patch = model.patch_size
    # Patch embedding as a matmul over unfolded patches (channel-major within a patch, like the conv weight).
    patches = F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, h*w, 3*p*p)
    tokens = (
        patches @ sd["patch_embed.proj.weight"].reshape(model.embed_dim, -1).T + sd["patch_embed.proj.bias"]
    )
    tokens = torch.cat((sd["cls_token"].expand(B, -1, -1), tokens), dim=1)
    pos = sd["pos_embed"]
    if tokens.shape[1] != pos.shape[1] or H != W:
        pos = dino_interpolate(pos, patch, H, W)
    tokens = tokens + pos
    for i in range(len(model.blocks)):
        tokens = hand_block(tokens, sd, i, heads)
    return layer_norm(tokens, sd["norm.weight"], sd["norm.bias"])


@pytest.mark.parametrize("hw", [(16, 16), (24, 24), (20, 28)])
def test_tiny_vit_equals_the_hand_written_transformer(hw):
    model = tiny()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model.forward_tokens(x)
        cls = model(x)
    expected = hand_tokens(model, x, heads=3)
    h, w = hw[0] // 4, hw[1] // 4
    assert got.shape == (2, 1 + h * w, 12)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls, expected[:, 0], atol=1e-5, rtol=1e-5)


def test_interpolation_keeps_the_training_grid_and_constants():
    model = tiny()
    assert model.interpolate_pos_encoding(16, 16, 16) is model.pos_embed
    with torch.no_grad():
        model.pos_embed[:, 1:] = torch.arange(12.0)  # the same vector at every grid position
    out = model.interpolate_pos_encoding(6 * 5, 24, 20)
    assert out.shape == (1, 31, 12)
    torch.testing.assert_close(out[0, 1:], torch.arange(12.0).expand(30, 12), atol=1e-5, rtol=0)


def test_load_weights_strict_on_a_meta_model(tmp_path):
    source = tiny(seed=4)
    path = tmp_path / "tiny.pth"
    torch.save({"teacher": {"backbone." + k: v.half() for k, v in source.state_dict().items()}}, path)
    with torch.device("meta"):
        target = vit.VisionTransformer(img_size=16, patch_size=4, dim=12, depth=2, num_heads=3)
    vit.load_weights(target, vit.load_dino_state_dict(str(path)), str(path))
    for name, value in target.state_dict().items():
        assert value.device.type == "cpu" and value.dtype == torch.float32, name
        torch.testing.assert_close(value, source.state_dict()[name].half().float())
    with pytest.raises(CopyscanError, match=r"depth 3\).*missing \(12\): blocks\.2\.norm1\.weight"):
        vit.load_weights(tiny(depth=3), source.state_dict(), "tiny.pth")
