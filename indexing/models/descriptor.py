"""Copy-detection descriptor on EfficientNet-Lite0, and the index-level post-processing it needs.

Two halves, as the pipeline runs them:
- ``preprocess`` (CPU, decode workers): PIL image → (3, S, S) uint8, transparency composited on white, squashed
  to S × S (no centre crop: copies are often crops, and a centre crop would cut what they share).
- ``CopyDescriptor`` (GPU if present): (B, 3, S, S) uint8 → (B, d) float32 unit vectors. It normalises the
  pixels itself, so only uint8 crosses from CPU workers to the model.

The index-level post-processing these vectors need (whitening learned on the database, score
normalisation against a background sample) is in ``indexing/build/postprocess.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.effnet import EfficientNetLite0
from copyscan.indexing.models.preprocess import BACKGROUND_RGB

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "instance" pixel normalisation maps each image's pixels (all channels together) to this mean and std in [0, 1]
# units before the ImageNet normalisation: brightness and contrast changes (affine in the pixel values) vanish.
INSTANCE_MEAN_STD = (0.45, 0.25)
PIXEL_NORMS = ("imagenet", "instance")

# Feature maps the descriptor can pool: the 1×1 head (classification features) or the output of a block.
LAYERS: dict[str, int | None] = {
    "head": None,  # (1280, S/32, S/32), after BN + ReLU6
    "block15": 15,  # (320, S/32, S/32), last MBConv block, linear output
    "block14": 14,  # (192, S/32, S/32)
    "block10": 10,  # (112, S/16, S/16)
    "block7": 7,  # (80, S/16, S/16)
}
CHANNELS = {"head": 1280, "block15": 320, "block14": 192, "block10": 112, "block7": 80}

# Chosen by bench/copy_eval.py (see docs in the report): what CopyDescriptor() builds with no options.
DEFAULT_OPTIONS: dict[str, Any] = {
    "size": 224,
    "layers": ("block15", "block10", "block7"),
    "p": 3.0,
    "regions": 2,
    "scales": (1.0,),
    "pixel_norm": "instance",
}

# What the index build and the scan do on top of the vectors (bench/copy_eval.py, bench/copy_detection.py):
# - "whitening": by default learned from pairs (image, ``copy_augment``-ed copy) embedded with a sample of the
#   database (``fit_learned_whitening``), else PCA-whitening of the database vectors (``fit_whitening``);
#   applied to database, query and background vectors alike (``apply_whitening``; output L2-normalised);
# - "score_normalisation": s − β·mean of the query's 1st–3rd nearest background similarities
#   (``background_bias``, ``normalised_scores``), the background being a held-aside database sample.


def gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the last two dims: x (B, C, H, W) → (B, C). p=1 is average, p→∞ max pooling.

    Maps may be negative (block outputs are linear): they are clamped at ``eps`` first, as in GeM.
    """
    if p == 1.0:
        return x.clamp(min=eps).mean(dim=(-2, -1))
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (Tolias et al. 2016) on an H × W map as (top, left, h, w): the whole map first, then for
    l = 2 .. levels + 1 an l × l grid of regions of 2/(l+1) of each side (about 40 % overlap).
    """
    regions = [(0, 0, height, width)]
    for level in range(2, levels + 2):
        rh = max(1, round(2 * height / (level + 1)))
        rw = max(1, round(2 * width / (level + 1)))
        tops = np.linspace(0, height - rh, num=level).round().astype(int)
        lefts = np.linspace(0, width - rw, num=level).round().astype(int)
        regions.extend((int(t), int(left), rh, rw) for t in tops for left in lefts)
    return list(dict.fromkeys(regions))


@lru_cache(maxsize=32)
def box_rects(
    boxes: tuple[tuple[float, ...], ...], height: int, width: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectangles ``CopyDescriptor.pool`` pools for each box on an ``height`` × ``width`` map: (owner
    box of each rectangle (n,) int64, its (top, left, bottom, right) cells (n, 4) int64): the R-MAC regions
    (``levels``; 0 = none) of the cells whose centres lie in the box (``regions.box_cells``)."""
    from copyscan.indexing.models.regions import box_cells

    owner, rects = [], []
    for r, box in enumerate(boxes):
        rows, cols = box_cells(box, height, width)
        sub_h, sub_w = rows.stop - rows.start, cols.stop - cols.start
        regions = rmac_regions(sub_h, sub_w, levels) if levels else [(0, 0, sub_h, sub_w)]
        for t, left, rh, rw in regions:
            top, left = rows.start + t, cols.start + left
            owner.append(r)
            rects.append((top, left, min(top + rh, height), min(left + rw, width)))
    return torch.tensor(owner, dtype=torch.long), torch.tensor(rects, dtype=torch.long).reshape(-1, 4)


class CopyDescriptor(torch.nn.Module):
    """EfficientNet-Lite0 features pooled into one L2-normalised vector per image.

    forward: x (B, 3, S, S) uint8 RGB → (B, dim) float32, unit norm.

    Options (all recorded by ``spec``):
    - size: the S that ``preprocess`` produces;
    - layers: feature maps pooled (names in ``LAYERS``); each pooled vector is L2-normalised, then they are
      concatenated with equal weight;
    - p: GeM exponent;
    - regions: 0 for global pooling; L > 0 adds the R-MAC regions of ``rmac_regions(h, w, L)`` (each
      GeM-pooled and L2-normalised, then summed);
    - scales: input rescalings (bilinear, antialiased); the vectors of every scale are summed;
    - pixel_norm: "imagenet" ((x/255 − mean)/std) or "instance" (each image first standardised over all its
      pixels and channels to ``INSTANCE_MEAN_STD``, then the same; removes global brightness/contrast changes);
    - mean, std: the ImageNet normalisation, in [0, 1] units.
    """

    def __init__(
        self,
        backbone: EfficientNetLite0,
        size: int = DEFAULT_OPTIONS["size"],
        layers: Sequence[str] = DEFAULT_OPTIONS["layers"],
        p: float = DEFAULT_OPTIONS["p"],
        regions: int = DEFAULT_OPTIONS["regions"],
        scales: Sequence[float] = DEFAULT_OPTIONS["scales"],
        pixel_norm: str = DEFAULT_OPTIONS["pixel_norm"],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        cpu_chunk: int = 8,
    ):
        super().__init__()
        unknown = [name for name in layers if name not in LAYERS]
        if unknown or not layers:
            raise CopyscanError(f"unknown layers {unknown or list(layers)}; choose from {', '.join(LAYERS)}")
        if size % 32 or size < 64:
            raise CopyscanError(f"descriptor input size must be a multiple of 32 and ≥ 64, got {size}")
        if p < 1.0 or regions < 0 or not scales or any(s <= 0 for s in scales):
            raise CopyscanError(f"invalid pooling options p={p}, regions={regions}, scales={list(scales)}")
        if pixel_norm not in PIXEL_NORMS:
            raise CopyscanError(f"pixel_norm must be one of {', '.join(PIXEL_NORMS)}, got {pixel_norm!r}")
        self.pixel_norm = pixel_norm
        self.backbone = fuse_batchnorm(backbone)
        self.size = int(size)
        self.layers = tuple(layers)
        self.p = float(p)
        self.regions = int(regions)
        self.scales = tuple(float(s) for s in scales)
        self.mean_rgb = tuple(float(m) for m in mean)
        self.std_rgb = tuple(float(s) for s in std)
        # On CPU small batches are several times faster (the working set stays in cache); results are identical.
        self.cpu_chunk = int(cpu_chunk)
        self.register_buffer(
            "_scale", 1.0 / (255.0 * torch.tensor(self.std_rgb).view(1, 3, 1, 1)), persistent=False
        )
        self.register_buffer(
            "_shift",
            (torch.tensor(self.mean_rgb) / torch.tensor(self.std_rgb)).view(1, 3, 1, 1),
            persistent=False,
        )
        self.dim = sum(CHANNELS[name] for name in self.layers)

    def spec(self) -> dict[str, Any]:
        """Everything that changes the vectors (JSON-able), for the index manifest."""
        return {
            "descriptor": "copy-gem",
            "preprocess": {
                "kind": "squash",
                "size": self.size,
                "resample": "bicubic-antialiased",
                "background": list(BACKGROUND_RGB),
            },
            "normalise": {
                "pixel_norm": self.pixel_norm,
                "instance_mean_std": list(INSTANCE_MEAN_STD) if self.pixel_norm == "instance" else None,
                "mean": list(self.mean_rgb),
                "std": list(self.std_rgb),
            },
            "layers": list(self.layers),
            "pooling": {"kind": "gem", "p": self.p, "rmac_levels": self.regions, "eps": 1e-6},
            "scales": list(self.scales),
            "bn_fused": True,
            "dim": self.dim,
        }

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) uint8 → float32, ImageNet-normalised (after per-image standardisation if "instance")."""
        x = x.float()
        if self.pixel_norm == "instance":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp(min=0.25)  # a flat image stays flat, not noise
            x = ((x - mean) / std * INSTANCE_MEAN_STD[1] + INSTANCE_MEAN_STD[0]) * 255.0
        return x * self._scale - self._shift

    def feature_maps(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """x: (B, 3, S, S) uint8 → maps[scale][layer], each (B, C, h, w) float, in ``scales``/``layers`` order."""
        taps = tuple(LAYERS[name] for name in self.layers if LAYERS[name] is not None)
        x = self.normalise(x)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        out = []
        for scale in self.scales:
            xs = x
            if scale != 1.0:
                side = max(32, int(round(self.size * scale / 32)) * 32)
                xs = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            tapped, head = self.backbone.forward_stages(xs, taps)
            by_index = dict(zip(taps, tapped, strict=True))
            out.append([head if LAYERS[name] is None else by_index[LAYERS[name]] for name in self.layers])
        return out

    def pool(self, maps: list[list[torch.Tensor]]) -> torch.Tensor:
        """maps[scale][layer] (B, C, h, w) → (B, dim) float32, L2-normalised."""
        total = None
        for per_layer in maps:
            parts = []
            for fmap in per_layer:
                fmap = fmap.float()
                if self.regions:
                    h, w = fmap.shape[-2:]
                    vec = sum(
                        F.normalize(gem(fmap[:, :, t : t + rh, l : l + rw], self.p), dim=1)
                        for t, l, rh, rw in rmac_regions(h, w, self.regions)
                    )
                else:
                    vec = gem(fmap, self.p)
                parts.append(F.normalize(vec, dim=1))
            vec = torch.cat(parts, dim=1)
            total = vec if total is None else total + vec
        return F.normalize(total, dim=1)

    def pool_boxes(self, maps: list[list[torch.Tensor]], boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """maps[scale][layer] (B, C, h, w) → (B, R, dim): each box (x0, y0, x1, y1 fractions) pooled like
        ``pool`` pools a whole map, from the cells whose centres lie in it
        (``copyscan.indexing.models.regions.box_cells``). The box (0, 0, 1, 1) gives ``pool(maps)``.

        Every (box, R-MAC region) rectangle is GeM-pooled from one summed-area table of the map's
        ``clamp(eps)^p`` (float64), so hundreds of boxes cost a few gathers, not a Python loop per box."""
        total = None
        for per_layer in maps:
            parts = []
            for fmap in per_layer:
                key = tuple(tuple(float(v) for v in box) for box in boxes)
                owner, rects = box_rects(key, fmap.shape[-2], fmap.shape[-1], self.regions)
                parts.append(F.normalize(self._pool_rects(fmap, owner, rects, len(boxes)), dim=1))
            vec = torch.cat(parts, dim=1)
            total = vec if total is None else total + vec
        return F.normalize(total, dim=1).transpose(1, 2)

    def _pool_rects(
        self, fmap: torch.Tensor, owner: torch.Tensor, rects: torch.Tensor, n_boxes: int
    ) -> torch.Tensor:
        """(B, C, h, w) map → (B, C, n_boxes): per box the sum of its rectangles' L2-normalised GeM vectors
        (``gem`` of each rectangle, exactly, up to float64 rounding of the table)."""
        powered = fmap.double().clamp(min=1e-6)
        if self.p != 1.0:
            powered = powered.pow(self.p)
        table = F.pad(powered.cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # (B, C, h + 1, w + 1)
        width1 = table.shape[-1]
        flat = table.flatten(2)
        top, left, bottom, right = rects.to(fmap.device).unbind(1)
        sums = (
            flat[:, :, bottom * width1 + right]
            - flat[:, :, top * width1 + right]
            - flat[:, :, bottom * width1 + left]
            + flat[:, :, top * width1 + left]
        )
        area = ((bottom - top) * (right - left)).to(sums.dtype)
        mean = (sums / area).clamp(min=1e-300)
        vec = F.normalize((mean if self.p == 1.0 else mean.pow(1.0 / self.p)).float(), dim=1)
        out = vec.new_zeros((*vec.shape[:2], n_boxes))
        return out.index_add_(2, owner.to(fmap.device), vec)

    def forward_boxes(self, x: torch.Tensor, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
        """x: (B, 3, S, S) uint8 RGB → (B, R, dim) float32: one forward pass, every box pooled from it."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise CopyscanError(f"CopyDescriptor takes (B, 3, S, S) uint8, got {tuple(x.shape)} {x.dtype}")
        if x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            return torch.cat([self.pool_boxes(self.feature_maps(c), boxes) for c in x.split(self.cpu_chunk)])
        return self.pool_boxes(self.feature_maps(x), boxes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) uint8 RGB → (B, dim) float32, L2-normalised."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise CopyscanError(f"CopyDescriptor takes (B, 3, S, S) uint8, got {tuple(x.shape)} {x.dtype}")
        if x.device.type == "cpu" and x.shape[0] > self.cpu_chunk:
            return torch.cat([self.pool(self.feature_maps(c)) for c in x.split(self.cpu_chunk)])
        return self.pool(self.feature_maps(x))


def fuse_batchnorm(model: EfficientNetLite0) -> EfficientNetLite0:
    """A copy of ``model`` (eval mode) with every BatchNorm folded into the convolution before it.

    Same outputs up to float rounding, about 1.5× faster on CPU.
    """
    fused = copy.deepcopy(model).eval()

    def fold(conv: torch.nn.Conv2d, bn: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(bn, torch.nn.BatchNorm2d):
            return bn  # already folded
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            conv.bias = torch.nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
        return torch.nn.Identity()

    fused._bn0 = fold(fused._conv_stem, fused._bn0)
    fused._bn1 = fold(fused._conv_head, fused._bn1)
    for block in fused._blocks:
        if block.expand:
            block._bn0 = fold(block._expand_conv, block._bn0)
        block._bn1 = fold(block._depthwise_conv, block._bn1)
        block._bn2 = fold(block._project_conv, block._bn2)
    return fused
