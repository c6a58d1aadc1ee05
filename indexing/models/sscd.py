"""SSCD (Pizzi et al., CVPR 2022): the released TorchScript copy-detection models, wrapped for the pipeline.

The released files (``sscd_disc_mixup.torchscript.pt``: ResNet-50, 512-d; ``sscd_disc_large.torchscript.pt``:
ResNeXt101, 1024-d; ``sscd_imagenet_*``) take a float (B, 3, H, W) ImageNet-normalised batch and return (B, d)
unit vectors. ``SSCDModule`` puts the pixel normalisation in front, so only uint8 crosses from the decode workers:
(B, 3, H, W) uint8 → (B, d) float32, unit norm.

Two preprocessing modes (embedder option ``resize``), both RGB (transparency on white), bilinear antialiased
(PIL's BILINEAR, what torchvision's Resize does to SSCD's PIL images), ImageNet mean/std:
- ``square`` (default): both sides resized to ``size`` (default 320), SSCD's batched setup; fixed-shape
  batches, the fast path.
- ``short_edge``: the paper's evaluation mode (``Resize(288)``, batch 1): the shorter side resized to ``size``
  (default 288), aspect kept, no crop, no padding. The decode workers emit each image at its own (3, H, W);
  the embedder runs the model on groups of images of identical shape (``shape_groups``), which for a
  per-image network is batch 1 up to float rounding. The longer side is capped at ``max_size`` (default
  ``MAX_ASPECT`` × size = 1152 at 288; torchvision's ``max_size`` rule, ``preprocess.short_edge_size``):
  the paper code has no cap, but an extremely elongated image (a 10000 × 20 banner) would otherwise become a
  288 × 144000 input; images up to 4:1 are resized exactly as published.
Both are recorded in the embedder spec (``preprocess``: kind, size, max_size, resample), so a scan refuses an
index built with the other mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.descriptor import IMAGENET_MEAN, IMAGENET_STD
from copyscan.indexing.models.preprocess import BACKGROUND_RGB

__all__ = [
    "BACKGROUND_RGB",
    "DEFAULT_SIZE",
    "GROUP_PIXELS",
    "MAX_ASPECT",
    "RESAMPLE",
    "RESIZE_MODES",
    "SHORT_EDGE_KIND",
    "SHORT_EDGE_SIZE",
    "SSCDModule",
    "load_torchscript",
    "probe_dim",
    "shape_groups",
]

DEFAULT_SIZE = 320  # resize=square: SSCD's batched setup
SHORT_EDGE_SIZE = 288  # resize=short_edge: the paper's evaluation
RESIZE_MODES = ("square", "short_edge")
SHORT_EDGE_KIND = "short-edge"  # the spec's preprocess kind for resize=short_edge
# resize=short_edge: default cap on the longer side, as a multiple of size (4:1 images are still exact)
MAX_ASPECT = 4
# resize=short_edge: at most this many pixels per forward pass (64 images at 320 × 320, the batched mode's
# default batch), so a group of large inputs needs no more memory than the batched mode
GROUP_PIXELS = 64 * 320 * 320
RESAMPLE = "bilinear-antialiased"  # torchvision Resize on PIL images (SSCD's transforms) is PIL's BILINEAR
# SSCD's own loader drops alpha (``convert("RGB")``); copyscan composites transparency on BACKGROUND_RGB
# (white) for every embedder, as the images would be shown.


def load_torchscript(local: str, device: torch.device) -> torch.jit.ScriptModule:
    """The TorchScript model in file ``local``, on ``device``, in eval mode."""
    try:
        with warnings.catch_warnings():
            # The released SSCD models exist only as TorchScript: the deprecation is not the user's to act on.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.load.* is deprecated", category=DeprecationWarning
            )
            model = torch.jit.load(local, map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise CopyscanError(
            f"{local} is not a TorchScript file ({exc.__class__.__name__}: {_first_line(exc)}); "
            "SSCD weights are the released *.torchscript.pt files, e.g. sscd_disc_mixup.torchscript.pt"
        ) from exc
    return model.eval()


class SSCDModule(torch.nn.Module):
    """forward: x (B, 3, H, W) uint8 RGB → (B, d) float32, unit norm: (x/255 − mean)/std → model → L2."""

    def __init__(
        self,
        model: torch.nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.model = model
        self.mean_rgb = tuple(float(m) for m in mean)
        self.std_rgb = tuple(float(s) for s in std)
        self.register_buffer("_mean", torch.tensor(self.mean_rgb).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std_rgb).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() / 255.0 - self._mean) / self._std
        return F.normalize(self.model(x).float(), dim=1)


def probe_dim(module: SSCDModule, size: int, device: torch.device, width: int | None = None) -> int:
    """Run ``module`` once on a zero batch of (2, 3, size, width or size) and return the output dimension d.

    Checks the (B, d) output contract at load time, so a wrong file, a too-small ``size`` or (with a
    ``width``) a model that only takes square inputs fails here with a clear message rather than inside an
    embedding actor.
    """
    width = width or size
    x = torch.zeros((2, 3, size, width), dtype=torch.uint8, device=device)
    try:
        with torch.inference_mode():
            y = module(x)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise CopyscanError(
            f"the SSCD model failed on a (2, 3, {size}, {width}) batch: {_first_line(exc)}"
        ) from exc
    if y.ndim != 2 or y.shape[0] != 2 or y.shape[1] < 1:
        raise CopyscanError(
            f"the SSCD model returned shape {tuple(y.shape)} for a batch of 2 images; expected (2, d)"
        )
    return int(y.shape[1])


def shape_groups(shapes: Sequence[tuple[int, ...]], max_pixels: int = GROUP_PIXELS) -> list[list[int]]:
    """Indices of ``shapes`` ((3, H, W) each) grouped by identical shape, in order of first appearance, each
    group split so that it holds at most ``max_pixels`` pixels (H · W summed; always at least one image).

    One forward pass per group gives every image the vector it gets alone (a per-image network, eval mode):
    the batch-1 evaluation without a pass per image when shapes repeat.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(i)
    groups = []
    for shape, rows in by_shape.items():
        per_pass = max(1, max_pixels // max(1, shape[-2] * shape[-1]))
        groups.extend(rows[start : start + per_pass] for start in range(0, len(rows), per_pass))
    return groups


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
