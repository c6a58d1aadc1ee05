"""The embedder interface: an embedder turns decoded uint8 pixels into L2-normalised descriptors.

An embedder has two halves that run in different places:
- ``preprocess`` (CPU, in the decode tasks): PIL image → (3, S, S) uint8 ((3, H, W), per image, for sscd's
  ``resize=short_edge``). Built from the spec alone (``make_preprocess``), so decode workers never load
  model weights.
- ``embed`` (GPU if present, in the embedding actors): (n, 3, S, S) uint8 → (n, d) float32, unit norm.

``spec`` records everything that changes the vectors (network, weights digest, input size, pooling,
normalisation); it goes into the index manifest, and a scan refuses an index whose spec differs from
the query embedder's (``fingerprint`` is its digest). The embedders themselves:
``copyscan.indexing.models.embedders``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.preprocess import make_preprocess


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


CROP_BATCH = 64  # crops per forward pass in embed_crops_each


class Embedder:
    """Base class. Subclasses set ``spec`` (JSON-able) and ``module`` (uint8 batch → unit vectors)."""

    spec: dict[str, Any]
    module: torch.nn.Module
    device: torch.device

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    @property
    def image_size(self) -> int:
        return int(self.spec["preprocess"]["size"])

    @property
    def fingerprint(self) -> str:
        return spec_fingerprint(self.spec)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return make_preprocess(self.spec["preprocess"])(img)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: (n, 3, S, S) uint8 RGB → (n, dim) float32, L2-normalised."""
        if isinstance(pixels, list):  # the decode workers send a list when the images' shapes differ
            raise CopyscanError(
                f"the {self.name} embedder takes fixed-size batches, got images of shapes "
                f"{sorted({tuple(p.shape) for p in pixels})[:4]}; only sscd with resize=short_edge takes those"
            )
        return self._run(self.module, pixels)

    @torch.inference_mode()
    def embed_boxes(self, pixels: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """pixels: (n, 3, S, S) uint8 RGB → (n, R, dim) float32: one L2-normalised vector per box (fractions
        x0, y0, x1, y1), all pooled from one forward pass (``copyscan.indexing.models.regions``). Box
        (0, 0, 1, 1) is ``embed``'s vector. Embedders without a pooled feature map cannot."""
        raise CopyscanError(
            f"the {self.name} embedder cannot pool region descriptors (partial copies); "
            "use embedder=effnet-lite0 or regions=false"
        )

    @torch.inference_mode()
    def embed_crops(self, pixels: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """pixels: (n, 3, S', S') uint8 RGB → (n, R, dim) float32: box r (fractions x0, y0, x1, y1) of every
        image cut out, resized to the embedder's input size (bicubic, antialiased, on the model's device)
        and embedded like an image. Works for every embedder: one forward pass per box."""
        x = torch.tensor(pixels).to(self.device, non_blocking=True)
        out = [self._run(self.module, self._crop(x, box)) for box in boxes]
        return np.stack(out, axis=1) if out else np.zeros((len(pixels), 0, self.dim), np.float32)

    @torch.inference_mode()
    def embed_crops_each(self, pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Like ``embed_crops`` with boxes of their own for every image: pixels (n, 3, S', S') uint8, boxes
        (n, B, 4) fractions, a row of NaN = no crop → (n, B, dim) float32, NaN rows where there was no crop.
        The crops of all images run together, ``CROP_BATCH`` per forward pass."""
        boxes = np.asarray(boxes, dtype=np.float32)
        out = np.full((*boxes.shape[:2], self.dim), np.nan, dtype=np.float32)
        images, slots = np.nonzero(np.isfinite(boxes).all(axis=-1))
        if not len(images):
            return out
        x = torch.tensor(pixels).to(self.device, non_blocking=True)
        for start in range(0, len(images), CROP_BATCH):
            i, b = images[start : start + CROP_BATCH], slots[start : start + CROP_BATCH]
            crops = torch.cat([self._crop(x[n : n + 1], boxes[n, m]) for n, m in zip(i, b, strict=True)])
            out[i, b] = self._run(self.module, crops)
        return out

    def _crop(self, x: torch.Tensor, box: Sequence[float], size: int = 0) -> torch.Tensor:
        """Box (fractions x0, y0, x1, y1) of the uint8 batch ``x`` (n, 3, H, W), at least one pixel, resized
        to ``size`` px (0: the embedder's input size; bicubic, antialiased) → (n, 3, S, S) uint8."""
        size = size or self.image_size
        side_h, side_w = x.shape[-2:]
        x0, y0, x1, y1 = (float(v) for v in box)
        top, left = min(side_h - 1, round(y0 * side_h)), min(side_w - 1, round(x0 * side_w))
        bottom, right = max(top + 1, round(y1 * side_h)), max(left + 1, round(x1 * side_w))
        crop = x[:, :, top:bottom, left:right]
        if crop.shape[-2:] != (size, size):
            crop = torch.nn.functional.interpolate(
                crop.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )
            crop = crop.round_().clamp_(0, 255).to(torch.uint8)
        return crop

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray) -> np.ndarray:
        """``fn`` on ``pixels`` on this embedder's device (fp16 autocast on CUDA); L2-normalised along the last
        axis, as float32 on the host."""
        # pixels may be a read-only view of a Ray object: copy into a tensor torch may write to.
        x = (
            pixels
            if isinstance(pixels, torch.Tensor)
            else torch.tensor(pixels).to(self.device, non_blocking=True)
        )
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                y = fn(x)
        else:
            y = fn(x)
        y = torch.nn.functional.normalize(y.float(), dim=-1)
        return y.cpu().numpy().astype(np.float32, copy=False)


def size_option(
    name: str, options: dict[str, Any] | None, known: Sequence[str], default: int, multiple: int = 1
) -> tuple[dict[str, Any], int]:
    """Validate embedder ``name``'s options (only ``known`` keys) and return them with the input ``size``
    (default ``default``; a positive integer, a multiple of ``multiple``)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CopyscanError(f"unknown {name} options {unknown}; known: {', '.join(known)}")
    size = options.get("size", default)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % multiple:
        what = "a positive integer" if multiple == 1 else f"a positive multiple of {multiple}"
        raise CopyscanError(f"{name} option size must be {what} (pixels), got {size!r}")
    return options, size


@lru_cache(maxsize=8)
def weights_digest(path: str, mtime: float) -> str:
    return file_sha256(path)


def fetch_weights(path: str) -> str:
    """A local copy of a weights file given by path or fsspec URL (downloaded once into the cache)."""
    from copyscan.indexing.store import storage

    if storage.is_local(path):
        local = storage.local_path(path)
        if not os.path.exists(local):
            raise CopyscanError(f"weights file {path} does not exist")
        return local
    cache = os.path.join(os.environ.get("COPYSCAN_CACHE", os.path.expanduser("~/.cache/copyscan")), "weights")
    name = hashlib.sha256(path.encode()).hexdigest()[:16] + "-" + os.path.basename(path)
    local = os.path.join(cache, name)
    if not os.path.exists(local):
        storage.download_file(path, local)
    return local
