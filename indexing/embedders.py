"""Embedder registry: an embedder turns decoded uint8 pixels into L2-normalised descriptors.

An embedder has two halves that run in different places:
- ``preprocess`` (CPU, in the decode tasks): PIL image → (3, S, S) uint8 ((3, H, W), per image, for sscd's
  ``resize=short_edge``). Built from the spec alone (``make_preprocess``), so decode workers never load
  model weights.
- ``embed`` (GPU if present, in the embedding actors): (n, 3, S, S) uint8 → (n, d) float32, unit norm.

``spec`` records everything that changes the vectors (network, weights digest, input size, pooling,
normalisation); it goes into the index manifest, and a scan refuses an index whose spec differs from
the query embedder's (``fingerprint`` is its digest).
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

from indexing.errors import CopyscanError

DEFAULT_EMBEDDER = "effnet-lite0"


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
        x0, y0, x1, y1), all pooled from one forward pass (``indexing.regions``). Box (0, 0, 1, 1) is ``embed``'s
        vector. Embedders without a pooled feature map cannot."""
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

    def _crop(self, x: torch.Tensor, box: Sequence[float]) -> torch.Tensor:
        """Box (fractions x0, y0, x1, y1) of the uint8 batch ``x`` (n, 3, H, W), at least one pixel, resized
        to the embedder's input size (bicubic, antialiased) → (n, 3, S, S) uint8."""
        size = self.image_size
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


# ---------------------------------------------------------------------------------------------------------
# Preprocessing, shared by every embedder that takes a square RGB input.


# PIL's filters are antialiased when downscaling; torchvision's Resize on a PIL image calls exactly these (and
# Resize(antialias=True) on tensors approximates them).
RESAMPLE = {
    "bilinear-antialiased": Image.Resampling.BILINEAR,
    "bicubic-antialiased": Image.Resampling.BICUBIC,
}


def make_preprocess(spec: dict[str, Any]) -> Callable[[Image.Image], np.ndarray]:
    """The preprocessing a spec describes: PIL image → (3, S, S) uint8.

    Kinds: "squash" (the effnet-lite0 descriptor's, ``indexing.descriptor.preprocess``), "resize" (RGB,
    transparency composited on ``background``, both sides resized to ``size`` with filter ``resample``),
    "clip" (shorter side to ``size``, centre crop) and "short-edge" (like "resize" but the shorter side to
    ``size``, aspect kept, longer side at most ``max_size``, no crop: (3, H, W) uint8, H and W per image).
    """
    kind = spec.get("kind")
    if kind == "squash":
        size = int(spec["size"])
        from indexing.descriptor import preprocess as squash

        return lambda img: squash(img, size)
    if kind == "clip":
        size = int(spec["size"])
        resample = RESAMPLE[spec["resample"]]
        background = tuple(int(c) for c in spec["background"])
        from indexing.descriptor import resize_crop_rgb

        return lambda img: resize_crop_rgb(img, size, resample, background)
    if kind in ("resize", "short-edge"):
        size = int(spec["size"])
        if spec.get("resample") not in RESAMPLE:
            raise CopyscanError(
                f"unknown resample filter {spec.get('resample')!r} in embedder spec; known: {', '.join(RESAMPLE)}"
            )
        resample = RESAMPLE[spec["resample"]]
        background = tuple(int(c) for c in spec["background"])
        from indexing.descriptor import resize_rgb, resize_short_edge_rgb

        if kind == "short-edge":
            max_size = int(spec["max_size"])
            return lambda img: resize_short_edge_rgb(img, size, max_size, resample, background)
        return lambda img: resize_rgb(img, size, resample, background)
    raise CopyscanError(f"unknown preprocessing kind {kind!r} in embedder spec")


# ---------------------------------------------------------------------------------------------------------
# Registry


@lru_cache(maxsize=8)
def _weights_digest(path: str, mtime: float) -> str:
    return file_sha256(path)


class EffnetLite0Embedder(Embedder):
    """EfficientNet-Lite0 (ImageNet weights, plain torch) with a copy-detection pooling head."""

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from indexing.descriptor import CopyDescriptor
        from indexing.effnet import load_efficientnet_lite0, package_weights_path

        path = weights or package_weights_path()
        local = _fetch_weights(path)
        self.device = pick_device(device)
        backbone = load_efficientnet_lite0(local)
        self.module = CopyDescriptor(backbone, **(options or {})).eval().to(self.device)
        self.spec = {
            "name": "effnet-lite0",
            "weights_sha256": _weights_digest(local, os.path.getmtime(local)),
            **self.module.spec(),
        }
        if "dim" not in self.spec:
            self.spec["dim"] = int(self.module.dim)

    @torch.inference_mode()
    def embed_boxes(self, pixels: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        return self._run(lambda x: self.module.forward_boxes(x, boxes), pixels)


class SSCDEmbedder(Embedder):
    """SSCD (Pizzi et al. 2022) from a released TorchScript file, e.g. ``sscd_disc_mixup.torchscript.pt``.

    ``weights`` (local path or fsspec URL) is required: copyscan ships no SSCD weights and downloads nothing
    itself. Preprocessing: RGB (transparency on white), PIL's antialiased bilinear filter, ImageNet mean/std
    (applied in the module, on the GPU), resized by option ``resize`` (``indexing.sscd``):
    - ``square`` (default): both sides to ``size`` (default 320), SSCD's batched setup;
    - ``short_edge``: the paper's evaluation mode, the shorter side to ``size`` (default 288), aspect kept,
      no crop, the longer side capped at ``max_size`` (default 4 × size); each image keeps its own shape and
      the model runs on groups of identical shape (batch 1 when all differ).
    ``dim`` is read off one forward pass at load time (512 for disc_mixup, 1024 for disc_large).
    """

    OPTIONS = ("size", "resize", "max_size")

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from indexing import sscd

        if not weights:
            raise CopyscanError(
                "the sscd embedder needs its weights: give a local path or URL of a released SSCD TorchScript "
                "file, e.g. weights=/models/sscd_disc_mixup.torchscript.pt (copyscan does not download them)"
            )
        preprocess = self._preprocess_spec(options)

        local = _fetch_weights(weights)
        self.device = pick_device(device)
        self.module = sscd.SSCDModule(sscd.load_torchscript(local, self.device)).eval().to(self.device)
        size = preprocess["size"]
        # short_edge: probe a 3:2 input, so a model that only takes squares is refused at load time
        width = size + size // 2 if preprocess["kind"] == sscd.SHORT_EDGE_KIND else None
        self.spec = {
            "name": "sscd",
            "weights_sha256": _weights_digest(local, os.path.getmtime(local)),
            "preprocess": preprocess,
            "normalise": {"mean": list(self.module.mean_rgb), "std": list(self.module.std_rgb)},
            "dim": sscd.probe_dim(self.module, size, self.device, width),
        }

    @classmethod
    def _preprocess_spec(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """The spec's ``preprocess`` for ``options``, validated (before any weights are read)."""
        from indexing import sscd

        resize = (options or {}).get("resize", "square")
        default = sscd.SHORT_EDGE_SIZE if resize == "short_edge" else sscd.DEFAULT_SIZE
        options, size = size_option("sscd", options, cls.OPTIONS, default)
        if resize not in sscd.RESIZE_MODES:
            raise CopyscanError(
                f"sscd option resize must be square (both sides to size, default {sscd.DEFAULT_SIZE}; batched) "
                f"or short_edge (the shorter side to size, default {sscd.SHORT_EDGE_SIZE}, aspect kept; the "
                f"paper's evaluation), got {resize!r}"
            )
        common = {"resample": sscd.RESAMPLE, "background": list(sscd.BACKGROUND_RGB)}
        if resize == "square":
            if "max_size" in options:
                raise CopyscanError(
                    "sscd option max_size caps the longer side with resize=short_edge; "
                    "resize=square makes every image size × size"
                )
            # unchanged from before resize existed, so indexes built then still match
            return {"kind": "resize", "size": size, **common}
        max_size = options.get("max_size", sscd.MAX_ASPECT * size)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= size:
            raise CopyscanError(
                f"sscd option max_size (the cap on the longer side with resize=short_edge) must be an integer "
                f"above size={size} (pixels), got {max_size!r}"
            )
        return {"kind": sscd.SHORT_EDGE_KIND, "size": size, "max_size": max_size, **common}

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """pixels: (n, 3, S, S) uint8 RGB, or with resize=short_edge n arrays (3, H_i, W_i) uint8 (a list, as
        the decode workers send images of different shapes) → (n, dim) float32, L2-normalised. Images of one
        shape share a forward pass (``sscd.shape_groups``); nothing is padded or cropped."""
        from indexing import sscd

        if self.spec["preprocess"]["kind"] != sscd.SHORT_EDGE_KIND:
            return super().embed(pixels)
        out = np.empty((len(pixels), self.dim), dtype=np.float32)
        for rows in sscd.shape_groups([image.shape for image in pixels], sscd.GROUP_PIXELS):
            out[rows] = self._run(self.module, np.stack([pixels[i] for i in rows]))
        return out


class DinoEmbedder(Embedder):
    """DINO ViT-B/16 (Caron et al. 2021) from the released backbone file ``dino_vitbase16_pretrain.pth``.

    ``weights`` (local path or fsspec URL) is required: copyscan ships no DINO weights and downloads nothing
    itself. The file is a state dict (plain, or inside a training checkpoint's "teacher"/"student"/"model"/
    "state_dict" entry, "module."/"backbone." prefixes stripped) loaded into ``indexing.vit`` strictly.
    Preprocessing is DINO's evaluation one without the crop: RGB (transparency on white), both sides resized to
    ``size`` (option, default 224, a multiple of 16; other sizes interpolate the position embeddings) with PIL's
    antialiased bicubic filter, ImageNet mean/std (in the module, on the GPU). The descriptor is the CLS token
    after the final LayerNorm, L2-normalised (768-d); ``tokens`` gives the patch tokens for region work.
    """

    OPTIONS = ("size",)
    PATCH_SIZE = 16
    DEFAULT_SIZE = 224
    RESAMPLE = "bicubic-antialiased"  # DINO's eval transforms: Resize(interpolation=3), i.e. PIL's BICUBIC

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from indexing import vit
        from indexing.descriptor import BACKGROUND_RGB

        if not weights:
            raise CopyscanError(
                "the dino-vitb16 embedder needs its weights: give a local path or URL of DINO's released ViT-B/16 "
                "backbone, e.g. weights=/models/dino_vitbase16_pretrain.pth (copyscan does not download them)"
            )
        _, size = size_option("dino-vitb16", options, self.OPTIONS, self.DEFAULT_SIZE, self.PATCH_SIZE)

        local = _fetch_weights(weights)
        state_dict = vit.load_dino_state_dict(local)
        # Built on the meta device: the checkpoint's tensors are assigned, nothing is initialised twice.
        with torch.device("meta"):
            backbone = vit.vit_base_patch16()
        vit.load_weights(backbone, state_dict, weights)
        self.device = pick_device(device)
        self.module = vit.DinoModule(backbone).eval().to(self.device)
        self.spec = {
            "name": "dino-vitb16",
            "weights_sha256": _weights_digest(local, os.path.getmtime(local)),
            "preprocess": {
                "kind": "resize",
                "size": size,
                "resample": self.RESAMPLE,
                "background": list(BACKGROUND_RGB),
            },
            "normalise": {"mean": list(self.module.mean_rgb), "std": list(self.module.std_rgb)},
            "global": "cls",
            "patch_size": self.PATCH_SIZE,
            "dim": backbone.embed_dim,
        }

    @torch.inference_mode()
    def tokens(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: (n, 3, S, S) uint8 RGB → patch tokens (n, (S/16)², 768) float32, each L2-normalised.

        Row-major over the (S/16) × (S/16) patch grid; the CLS token (``embed``) is not included.
        """
        return self._run(self.module.tokens, pixels)


class ClipEmbedder(Embedder):
    """The CLIP image encoder of LAION's precomputed embeddings (``indexing/clip_import.py``), for queries.

    ``weights``: a TorchScript file of the image encoder (float (B, 3, S, S) CLIP-normalised → (B, d), e.g.
    ``torch.jit.trace(model.visual, ...)`` of the open_clip/OpenAI model the embeddings were made with);
    required, nothing is downloaded. ``options["model"]`` names that model and must equal the index's: the
    spec (model name, CLIP's preprocessing, dim) is what a scan compares, since LAION's vectors carry no
    digest of their weights. Preprocessing is CLIP's: shorter side to 224 (bicubic), centre crop, CLIP mean/std.
    """

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from indexing import clip_import, sscd

        spec = clip_import.clip_spec(options, 0)  # validates the options before anything is loaded
        if not weights:
            raise CopyscanError(
                f"embedding queries for a {clip_import.NAME} index needs the CLIP image encoder its vectors came "
                "from, as TorchScript: weights=/models/clip-vit-l-14-visual.torchscript.pt (nothing is downloaded)"
            )
        local = _fetch_weights(weights)
        self.device = pick_device(device)
        module = sscd.SSCDModule(
            sscd.load_torchscript(local, self.device), clip_import.CLIP_MEAN, clip_import.CLIP_STD
        )
        self.module = module.eval().to(self.device)
        spec["dim"] = sscd.probe_dim(self.module, spec["preprocess"]["size"], self.device)
        self.spec = spec
        self.weights_sha256 = _weights_digest(local, os.path.getmtime(local))


EMBEDDERS: dict[str, type[Embedder]] = {
    "effnet-lite0": EffnetLite0Embedder,
    "sscd": SSCDEmbedder,
    "dino-vitb16": DinoEmbedder,
    "laion-clip": ClipEmbedder,
}


def load_embedder(
    name: str = DEFAULT_EMBEDDER,
    weights: str | None = None,
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> Embedder:
    """Instantiate embedder ``name`` (model loaded once; call this in an actor's ``__init__``)."""
    try:
        cls = EMBEDDERS[name]
    except KeyError:
        raise CopyscanError(f"unknown embedder {name!r}; available: {', '.join(sorted(EMBEDDERS))}") from None
    return cls(weights=weights, device=device, options=options)


def _fetch_weights(path: str) -> str:
    """A local copy of a weights file given by path or fsspec URL (downloaded once into the cache)."""
    from indexing import storage

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
