"""CLIP as LAION used it: the spec of its image vectors, and the image encoder that embeds queries for an index
of LAION's precomputed CLIP embeddings (imported by ``copyscan.indexing.embed.clip_import``)."""

from __future__ import annotations

import os
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedder import (
    Embedder,
    fetch_weights,
    pick_device,
    size_option,
    weights_digest,
)

NAME = "laion-clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 224
OPTIONS = ("model", "size")


def clip_spec(options: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """The embedder spec of CLIP vectors of model ``options["model"]``: the same for the imported vectors and
    for the query encoder, so that a scan checks the two agree (name, model, preprocessing, dim)."""
    options, size = size_option(NAME, options, OPTIONS, DEFAULT_SIZE)
    model = options.get("model")
    if not model or not isinstance(model, str):
        raise CopyscanError(
            f"{NAME} needs the CLIP model its vectors come from, e.g. embedder_options={{model: ViT-L-14}} "
            "(LAION-2B's published embeddings are ViT-L/14)"
        )
    return {
        "name": NAME,
        "model": model,
        # CLIP's own transform: short side to size (bicubic), centre crop, CLIP mean/std
        "preprocess": {
            "kind": "clip",
            "size": size,
            "resample": "bicubic-antialiased",
            "background": [255] * 3,
        },
        "normalise": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "dim": int(dim),
    }


class ClipEmbedder(Embedder):
    """The CLIP image encoder of LAION's precomputed embeddings (``indexing/embed/clip_import.py``), for queries.

    ``weights``: a TorchScript file of the image encoder (float (B, 3, S, S) CLIP-normalised → (B, d), e.g.
    ``torch.jit.trace(model.visual, ...)`` of the open_clip/OpenAI model the embeddings were made with);
    required, nothing is downloaded. ``options["model"]`` names that model and must equal the index's: the
    spec (model name, CLIP's preprocessing, dim) is what a scan compares, since LAION's vectors carry no
    digest of their weights. Preprocessing is CLIP's: shorter side to 224 (bicubic), centre crop, CLIP mean/std.
    """

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from copyscan.indexing.models import sscd

        spec = clip_spec(options, 0)  # validates the options before anything is loaded
        if not weights:
            raise CopyscanError(
                f"embedding queries for a {NAME} index needs the CLIP image encoder its vectors came "
                "from, as TorchScript: weights=/models/clip-vit-l-14-visual.torchscript.pt (nothing is downloaded)"
            )
        local = fetch_weights(weights)
        self.device = pick_device(device)
        module = sscd.SSCDModule(sscd.load_torchscript(local, self.device), CLIP_MEAN, CLIP_STD)
        self.module = module.eval().to(self.device)
        spec["dim"] = sscd.probe_dim(self.module, spec["preprocess"]["size"], self.device)
        self.spec = spec
        self.weights_sha256 = weights_digest(local, os.path.getmtime(local))
