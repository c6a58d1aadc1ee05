"""The embedder registry: ``embedder=NAME`` → the class that loads it (model loaded once per actor).

The interface every embedder implements, its spec and preprocessing: ``copyscan.indexing.models.embedder``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.clip import ClipEmbedder
from copyscan.indexing.models.embedder import (
    Embedder,
    fetch_weights,
    pick_device,
    size_option,
    weights_digest,
)

DEFAULT_EMBEDDER = "effnet-lite0"


class EffnetLite0Embedder(Embedder):
    """EfficientNet-Lite0 (ImageNet weights, plain torch) with a copy-detection pooling head."""

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from copyscan.indexing.models.descriptor import CopyDescriptor
        from copyscan.indexing.models.effnet import load_efficientnet_lite0, package_weights_path

        path = weights or package_weights_path()
        local = fetch_weights(path)
        self.device = pick_device(device)
        backbone = load_efficientnet_lite0(local)
        self.module = CopyDescriptor(backbone, **(options or {})).eval().to(self.device)
        self.spec = {
            "name": "effnet-lite0",
            "weights_sha256": weights_digest(local, os.path.getmtime(local)),
            **self.module.spec(),
        }
        if "dim" not in self.spec:
            self.spec["dim"] = int(self.module.dim)

    @torch.inference_mode()
    def embed_boxes(self, pixels: np.ndarray, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        return self._run(lambda x: self.module.forward_boxes(x, boxes), pixels)


class SSCDEmbedder(Embedder):
    """SSCD (Pizzi et al. 2022) from a released TorchScript file, e.g. ``sscd_disc_mixup.torchscript.pt``, or
    from an ONNX export (``*.onnx``, run with onnxruntime: ``copyscan.indexing.models.sscd_onnx``, which also
    says how the model's declared input decides what it is fed; the spec then records ``runtime: onnx`` and
    that ``input`` layout).

    ``weights`` (local path or fsspec URL) is required: copyscan ships no SSCD weights and downloads nothing
    itself. Preprocessing: RGB (transparency on white), PIL's antialiased bilinear filter, ImageNet mean/std
    (applied in the module, on the GPU), resized by option ``resize`` (``copyscan.indexing.models.sscd``):
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
        from copyscan.indexing.models import sscd, sscd_onnx

        if not weights:
            raise CopyscanError(
                "the sscd embedder needs its weights: give a local path or URL of a released SSCD TorchScript "
                "file, e.g. weights=/models/sscd_disc_mixup.torchscript.pt, or of an ONNX export (*.onnx) "
                "(copyscan does not download them)"
            )
        preprocess = self._preprocess_spec(options)

        local = fetch_weights(weights)
        self.device = pick_device(device)
        runtime = {}
        if sscd_onnx.is_onnx(local):
            self.module = sscd_onnx.OnnxSSCDModule(sscd_onnx.open_session(local, self.device)).eval()
            runtime = {"runtime": "onnx", "input": self.module.layout}
        else:
            self.module = sscd.SSCDModule(sscd.load_torchscript(local, self.device)).eval().to(self.device)
        size = preprocess["size"]
        # short_edge: probe a 3:2 input, so a model that only takes squares is refused at load time
        width = size + size // 2 if preprocess["kind"] == sscd.SHORT_EDGE_KIND else None
        self.spec = {
            "name": "sscd",
            "weights_sha256": weights_digest(local, os.path.getmtime(local)),
            "preprocess": preprocess,
            # a uint8 ONNX input normalises in the model: copyscan applies nothing
            "normalise": {"mean": list(self.module.mean_rgb), "std": list(self.module.std_rgb)}
            if runtime.get("input", "float-nchw") == "float-nchw"
            else "in-model",
            **runtime,
            "dim": sscd.probe_dim(self.module, size, self.device, width),
        }

    @classmethod
    def _preprocess_spec(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """The spec's ``preprocess`` for ``options``, validated (before any weights are read)."""
        from copyscan.indexing.models import sscd

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
        from copyscan.indexing.models import sscd

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
    "state_dict" entry, "module."/"backbone." prefixes stripped) loaded into ``copyscan.indexing.models.vit``
    strictly. Preprocessing is DINO's evaluation one without the crop: RGB (transparency on white), both sides
    resized to ``size`` (option, default 224, a multiple of 16; other sizes interpolate the position
    embeddings) with PIL's antialiased bicubic filter, ImageNet mean/std (in the module, on the GPU). The
    descriptor is the CLS token after the final LayerNorm, L2-normalised (768-d); ``tokens`` gives the patch
    tokens for region work.
    """

    OPTIONS = ("size",)
    PATCH_SIZE = 16
    DEFAULT_SIZE = 224
    RESAMPLE = "bicubic-antialiased"  # DINO's eval transforms: Resize(interpolation=3), i.e. PIL's BICUBIC

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from copyscan.indexing.models import vit
        from copyscan.indexing.models.preprocess import BACKGROUND_RGB

        if not weights:
            raise CopyscanError(
                "the dino-vitb16 embedder needs its weights: give a local path or URL of DINO's released ViT-B/16 "
                "backbone, e.g. weights=/models/dino_vitbase16_pretrain.pth (copyscan does not download them)"
            )
        _, size = size_option("dino-vitb16", options, self.OPTIONS, self.DEFAULT_SIZE, self.PATCH_SIZE)

        local = fetch_weights(weights)
        state_dict = vit.load_dino_state_dict(local)
        # Built on the meta device: the checkpoint's tensors are assigned, nothing is initialised twice.
        with torch.device("meta"):
            backbone = vit.vit_base_patch16()
        vit.load_weights(backbone, state_dict, weights)
        self.device = pick_device(device)
        self.module = vit.DinoModule(backbone).eval().to(self.device)
        self.spec = {
            "name": "dino-vitb16",
            "weights_sha256": weights_digest(local, os.path.getmtime(local)),
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
