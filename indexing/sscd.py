"""SSCD (Pizzi et al., CVPR 2022): the released TorchScript copy-detection models, wrapped for the pipeline.

The released files (``sscd_disc_mixup.torchscript.pt``: ResNet-50, 512-d; ``sscd_disc_large.torchscript.pt``:
ResNeXt101, 1024-d; ``sscd_imagenet_*``) take a float (B, 3, H, W) ImageNet-normalised batch and return (B, d)
unit vectors. ``SSCDModule`` puts the pixel normalisation in front, so only uint8 crosses from the decode workers:
(B, 3, S, S) uint8 → (B, d) float32, unit norm.

Preprocessing is the published batched one (RGB, both sides resized to 320 with bilinear, antialiased, ImageNet
mean/std). The paper's evaluation mode (short edge to 288 keeping aspect, batch 1) is not offered: the pipeline
needs fixed-shape batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from indexing.descriptor import BACKGROUND_RGB, IMAGENET_MEAN, IMAGENET_STD
from indexing.errors import CopyscanError

__all__ = ["BACKGROUND_RGB", "DEFAULT_SIZE", "RESAMPLE", "SSCDModule", "load_torchscript", "probe_dim"]

DEFAULT_SIZE = 320
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
    """forward: x (B, 3, S, S) uint8 RGB → (B, d) float32, unit norm: (x/255 − mean)/std → model → L2."""

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


def probe_dim(module: SSCDModule, size: int, device: torch.device) -> int:
    """Run ``module`` once on a zero batch of (2, 3, size, size) and return the output dimension d.

    Checks the (B, d) output contract at load time, so a wrong file or a too-small ``size`` fails here with a
    clear message rather than inside an embedding actor.
    """
    x = torch.zeros((2, 3, size, size), dtype=torch.uint8, device=device)
    try:
        with torch.inference_mode():
            y = module(x)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        raise CopyscanError(
            f"the SSCD model failed on a (2, 3, {size}, {size}) batch: {_first_line(exc)}"
        ) from exc
    if y.ndim != 2 or y.shape[0] != 2 or y.shape[1] < 1:
        raise CopyscanError(
            f"the SSCD model returned shape {tuple(y.shape)} for a batch of 2 images; expected (2, d)"
        )
    return int(y.shape[1])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
