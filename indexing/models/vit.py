"""Vision Transformer in plain torch, laid out exactly as DINO's ``vision_transformer.py`` (Caron et al. 2021).

Parameter names and shapes equal the official ones, so the released backbone checkpoints (e.g.
``dino_vitbase16_pretrain.pth``: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.norm1.*``,
``blocks.N.attn.qkv.*``, ``blocks.N.attn.proj.*``, ``blocks.N.norm2.*``, ``blocks.N.mlp.fc1.*``,
``blocks.N.mlp.fc2.*``, ``norm.*``) load with ``load_state_dict(strict=True)``. As in DINO's ``vit_base``:
pre-norm blocks, LayerNorm eps 1e-6, qkv with bias, exact (erf) GELU, MLP ratio 4, no classifier head; position
embeddings are interpolated bicubically (DINO's ``interpolate_pos_encoding``, ``+ 0.1`` included) for inputs
other than the training size. Dropout and stochastic depth are left out: this module only runs inference.

``DinoModule`` puts the pixel normalisation in front, so only uint8 crosses from the decode workers.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.descriptor import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DinoModule",
    "VisionTransformer",
    "load_dino_state_dict",
    "load_weights",
    "unwrap_state_dict",
    "vit_base_patch16",
]

LAYER_NORM_EPS = 1e-6
# Keys under which training checkpoints keep the backbone (DINO's ``checkpoint.pth``: "teacher"/"student").
CHECKPOINT_KEYS = ("teacher", "state_dict", "model", "student")
# Prefixes DINO's own ``load_pretrained_weights`` strips: DDP's and the multi-crop wrapper's.
PREFIXES = ("module.", "backbone.")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # softmax(q kᵀ / sqrt(head_dim)) v, as DINO writes it out; the fused kernel saves memory on the GPU.
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, dim), row-major over the patch grid


class VisionTransformer(nn.Module):
    """DINO's ViT backbone: (B, 3, H, W) float, ImageNet-normalised → CLS (B, dim).

    ``img_size`` is the training size; it sets the position-embedding grid ((img_size / patch_size)² + 1 rows).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        self.embed_dim = dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, npatch: int, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an (h, w)-pixel input with ``npatch`` patches: (1, 1 + npatch, dim).

        DINO's ``interpolate_pos_encoding`` (its ``w`` is the height): bicubic on the square training grid with
        scale (h0 + 0.1) / sqrt(N) — the 0.1 avoids a floating-point off-by-one in the output size (DINO issue 8).
        """
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = self.pos_embed.shape[-1]
        h0 = h // self.patch_size + 0.1
        w0 = w // self.patch_size + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)),
            mode="bicubic",
        )
        if int(h0) != patch_pos_embed.shape[-2] or int(w0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos_embed.shape[-2:])}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, normalised → (B, 1 + h*w, dim) after the final LayerNorm (CLS first).

        h = H // patch_size, w = W // patch_size; patch tokens in row-major order. 197 × 768 for ViT-B/16 at 224.
        """
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, normalised → CLS token (B, dim), not L2-normalised (DINO's ``forward``)."""
        return self.forward_tokens(x)[:, 0]


def _init_weights(m: nn.Module) -> None:
    # DINO's (timm's) initialisation; only tests run a randomly initialised model.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit_base_patch16(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16 as DINO's ``vit_base(patch_size=16)``: 768-d, depth 12, 12 heads, 85,798,656 parameters."""
    return VisionTransformer(patch_size=16, dim=768, depth=12, num_heads=12, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone state dict inside a DINO checkpoint: plain, or under "teacher"/"state_dict"/"model"/"student".

    "module." and "backbone." prefixes are stripped, as DINO's ``load_pretrained_weights`` does. A training
    checkpoint's multi-crop wrapper also holds the projection head (``head.*``); when the keys carry "backbone.",
    only those are kept (DINO drops the head by loading with ``strict=False``).
    """
    state = checkpoint
    for key in CHECKPOINT_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    keys = [_strip(k, ("module.",)) for k in state]
    if any(k.startswith("backbone.") for k in keys):
        state = {k: v for k, v in zip(keys, state.values(), strict=True) if k.startswith("backbone.")}
    return {_strip(k, PREFIXES): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_dino_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The backbone state dict in the local checkpoint file ``path`` (tensors only, on the CPU; see ``unwrap``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CopyscanError(
            f"{path} is not a loadable torch state dict ({exc.__class__.__name__}: {_first_line(exc)}); DINO weights "
            "are the released backbone files, e.g. dino_vitbase16_pretrain.pth (a training checkpoint.pth holds "
            "pickled arguments too: save its ['teacher'] dict alone with torch.save)"
        ) from exc
    if not isinstance(checkpoint, Mapping):
        raise CopyscanError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return unwrap_state_dict(checkpoint)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; a mismatch raises CopyscanError listing the keys and shapes.

    ``model`` may live on the meta device (built without allocating): the tensors are then assigned, not copied.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"{label} ({len(items)}): {', '.join(items[:8])}{', ...' if len(items) > 8 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if items
        ]
        raise CopyscanError(
            f"{source} does not match DINO's {_describe(model)}: {'; '.join(problems)}. "
            "Use a DINO ViT backbone checkpoint of that architecture, e.g. dino_vitbase16_pretrain.pth"
        )
    on_meta = any(p.is_meta for p in model.parameters())
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(floats, strict=True, assign=on_meta)
    return model


def _describe(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return f"ViT (patch {model.patch_size}, dim {model.embed_dim}, depth {len(model.blocks)})"
    return type(model).__name__


def _strip(key: str, prefixes: Sequence[str]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


# ---------------------------------------------------------------------------------------------------------
# The pipeline's module: uint8 pixels in, unit vectors out.


class DinoModule(nn.Module):
    """uint8 (B, 3, S, S) RGB → (x/255 − mean)/std → ViT. ``forward``: CLS (B, dim); ``tokens``: (B, h*w, dim).

    Both outputs are float32 and L2-normalised (each token on its own).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.vit = vit
        self.mean_rgb = tuple(float(m) for m in mean)
        self.std_rgb = tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean_rgb).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std_rgb).view(1, 3, 1, 1), persistent=False)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vit(self._normalise(x)).float(), dim=-1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vit.forward_tokens(self._normalise(x))[:, 1:].float(), dim=-1)
