"""CLIP as LAION used it: the spec of its image vectors, and the image encoder that embeds queries for an index
of LAION's precomputed CLIP embeddings (imported by ``copyscan.indexing.embed.clip_import``).

The query encoder is either a TorchScript image tower (any torch install) or, with the optional
``copyscan[clip]`` extra (open_clip, which needs torchvision: GPU clusters), an open_clip checkpoint of model
``embedder_options["model"]``; open_clip's evaluation transform of that model is translated into copyscan's
preprocessing spec (``open_clip_preprocess``), so the decode workers do the same operations, and a transform
copyscan cannot do the same way is refused rather than approximated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

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
OPTIONS = ("model", "size", "pretrained")
BACKGROUND = [255] * 3  # transparency composited on white, as for every copyscan embedder

# Weights files read by open_clip: always for these suffixes; for .pt/.pth when the file is not TorchScript.
OPEN_CLIP_SUFFIXES = (".safetensors", ".bin")
TORCH_SAVE_SUFFIXES = (".pt", ".pth")
CLIP_EXTRA = "pip install 'copyscan[clip]'"
# open_clip's eval interpolation → copyscan's filter. torchvision's Resize on a PIL image is PIL's (antialiased)
# filter; "random" is a training setting that open_clip's eval transform runs as bicubic.
OPEN_CLIP_RESAMPLE = {
    "bicubic": "bicubic-antialiased",
    "bilinear": "bilinear-antialiased",
    "random": "bicubic-antialiased",
}
# open_clip's eval resize_mode → copyscan's preprocess kind: "shortest" is Resize(size) + CenterCrop(size)
# (copyscan's "clip"), "squash" is Resize((size, size)) (copyscan's "resize"). "longest" (the longer side to
# size, then padded with fill_color) has no copyscan kind.
OPEN_CLIP_KINDS = {"shortest": "clip", "squash": "resize"}


def _preprocess(kind: str, size: int, resample: str) -> dict[str, Any]:
    return {"kind": kind, "size": size, "resample": resample, "background": list(BACKGROUND)}


def clip_spec(options: dict[str, Any] | None, dim: int) -> dict[str, Any]:
    """The embedder spec of CLIP vectors of model ``options["model"]``: the same for the imported vectors and
    for the query encoder, so that a scan checks the two agree (name, model, preprocessing, dim).

    Option ``pretrained`` (an open_clip release tag, e.g. ``openai``) is recorded when given; an open_clip
    checkpoint then loads with that release's settings (``ClipEmbedder``)."""
    options, size = size_option(NAME, options, OPTIONS, DEFAULT_SIZE)
    model = options.get("model")
    if not model or not isinstance(model, str):
        raise CopyscanError(
            f"{NAME} needs the CLIP model its vectors come from, e.g. embedder_options={{model: ViT-L-14}} "
            "(LAION-2B's published embeddings are ViT-L/14)"
        )
    pretrained = options.get("pretrained")
    if pretrained is not None and (not pretrained or not isinstance(pretrained, str)):
        raise CopyscanError(
            f"{NAME} option pretrained names the open_clip release of the weights (a tag, e.g. openai), "
            f"got {pretrained!r}"
        )
    spec = {
        "name": NAME,
        "model": model,
        # CLIP's own transform: short side to size (bicubic), centre crop, CLIP mean/std
        "preprocess": _preprocess("clip", size, "bicubic-antialiased"),
        "normalise": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "dim": int(dim),
    }
    if pretrained:
        spec["pretrained"] = pretrained
    return spec


def open_clip_preprocess(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """copyscan's ``preprocess`` and ``normalise`` spec entries for open_clip's evaluation transform of the
    preprocess config ``cfg`` (the fields of ``open_clip.transform.PreprocessCfg``: size, mode, mean, std,
    interpolation, resize_mode, fill_color; empty ones take open_clip's ``image_transform`` fallbacks).

    Refused with a CopyscanError: what copyscan's preprocess kinds would do differently (resize_mode
    "longest", a non-square size, a mode other than RGB)."""
    size = cfg.get("size", DEFAULT_SIZE)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise CopyscanError(
                f"open_clip preprocessing to {tuple(size)} (height, width) is not supported: copyscan's "
                "preprocessing makes square inputs"
            )
        size = size[0]
    mode = cfg.get("mode") or "RGB"
    resize_mode = cfg.get("resize_mode") or "shortest"
    interpolation = cfg.get("interpolation") or "bicubic"
    unsupported = []
    if mode != "RGB":
        unsupported.append(f"mode {mode!r} (copyscan feeds RGB)")
    if resize_mode not in OPEN_CLIP_KINDS:
        unsupported.append(
            f"resize_mode {resize_mode!r} (copyscan does {' and '.join(map(repr, OPEN_CLIP_KINDS))}: "
            "shorter side to size + centre crop, or both sides to size)"
        )
    if interpolation not in OPEN_CLIP_RESAMPLE:
        unsupported.append(f"interpolation {interpolation!r} (copyscan does bicubic and bilinear)")
    if unsupported:
        raise CopyscanError(f"open_clip preprocessing with {'; '.join(unsupported)} is not supported")
    mean, std = cfg.get("mean") or CLIP_MEAN, cfg.get("std") or CLIP_STD
    mean, std = ((v,) * 3 if isinstance(v, (int, float)) else tuple(v) for v in (mean, std))
    return (
        _preprocess(OPEN_CLIP_KINDS[resize_mode], int(size), OPEN_CLIP_RESAMPLE[interpolation]),
        {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
    )


class EncodeImage(torch.nn.Module):
    """forward: x (B, 3, S, S) float, normalised → ``model.encode_image(x)`` (B, d), as open_clip computes it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


def load_open_clip(
    local: str, weights: str, model: str, pretrained: str | None, why: str = ""
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(open_clip's ``model`` with the weights in file ``local`` (a state dict: .safetensors, .bin, .pt, .pth),
    in eval mode on the CPU; its preprocess config, every PreprocessCfg field). Nothing is downloaded.

    ``open_clip.create_model(model, pretrained=local)`` as open_clip builds a checkpoint file: the model's
    image size, open_clip's default preprocessing. With an open_clip release tag ``pretrained``, that release's
    settings (quick_gelu, mean/std, interpolation, resize mode) apply, as ``pretrained=TAG`` would give them.
    ``why`` is said after ``weights`` in errors (why the file is read by open_clip)."""
    try:
        import open_clip
        from open_clip.transform import PreprocessCfg
    except (ImportError, RuntimeError, OSError) as exc:
        # RuntimeError: open_clip is installed, but torchvision's ops were built for another torch (CPU torch)
        raise CopyscanError(
            f"{weights}{why} is read as an open_clip checkpoint, and open_clip does not import here "
            f"({exc.__class__.__name__}: {_first_line(exc)}): {CLIP_EXTRA} on a machine where torchvision "
            "works (GPU clusters), or give the CLIP image tower as TorchScript, "
            "weights=/models/clip-vit-l-14-visual.torchscript.pt"
        ) from exc
    arch = model.replace("/", "-")  # how open_clip looks the name up (ViT-L/14 is ViT-L-14)
    # a schema (hf-hub:, local-dir:) would download, or ignore the file
    if ":" in model or open_clip.get_model_config(arch) is None:
        raise CopyscanError(
            f"open_clip has no built-in model {model!r}: embedder_options model must be one of "
            "open_clip.list_models(), e.g. ViT-L-14, ViT-L-14-quickgelu (OpenAI's weights without pretrained: "
            "openai), ViT-H-14"
        )
    quick_gelu, force = False, {}
    if pretrained:
        release = open_clip.get_pretrained_cfg(arch, pretrained)  # a table look-up: nothing is downloaded
        if not release:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise CopyscanError(
                f"open_clip has no release {pretrained!r} of {model}; its tags: {', '.join(tags) or 'none'}"
            )
        quick_gelu = bool(release.get("quick_gelu", False))
        keys = [field.name for field in dataclasses.fields(PreprocessCfg)]
        force = {key: release[key] for key in keys if release.get(key) is not None}
    try:
        clip = open_clip.create_model(
            model, pretrained=local, force_quick_gelu=quick_gelu, force_preprocess_cfg=force or None
        )
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, AssertionError) as exc:
        raise CopyscanError(
            f"open_clip could not load {weights}{why} as {model} ({exc.__class__.__name__}: "
            f"{_first_line(exc)[:400]}); give the checkpoint of that model (open_clip_model.safetensors, "
            "open_clip_pytorch_model.bin)"
        ) from exc
    cfg = dataclasses.asdict(PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip)))
    return clip.eval(), cfg


class ClipEmbedder(Embedder):
    """The CLIP image encoder of LAION's precomputed embeddings (``indexing/embed/clip_import.py``), for queries.

    ``weights`` (local path or fsspec URL; required, nothing is downloaded) is either
    - a TorchScript file of the image encoder (float (B, 3, S, S) CLIP-normalised → (B, d), e.g.
      ``torch.jit.trace(model.visual, ...)`` of the open_clip/OpenAI model the embeddings were made with);
      preprocessing is CLIP's: shorter side to ``size`` (default 224, bicubic), centre crop, CLIP mean/std; or
    - an open_clip checkpoint (``.safetensors``, ``.bin``, or ``.pt``/``.pth`` that is not TorchScript) of
      model ``options["model"]`` (open_clip's name, e.g. ViT-L-14), with the ``copyscan[clip]`` extra; the
      vector is ``encode_image``'s, the preprocessing open_clip's for that model (``load_open_clip``;
      ``options["pretrained"]``: the open_clip release tag the weights are, for its quick_gelu and
      preprocessing). A ``size`` option must then be the model's input size.
    ``options["model"]`` names the model and must equal the index's: the spec (model name, preprocessing, dim)
    is what a scan compares, since LAION's vectors carry no digest of their weights; an open_clip model whose
    preprocessing is not CLIP's gets a spec that an imported index's does not match (the scan refuses).
    """

    def __init__(
        self, weights: str | None = None, device: str = "auto", options: dict[str, Any] | None = None
    ):
        from copyscan.indexing.models import sscd

        spec = clip_spec(options, 0)  # validates the options before anything is loaded
        if not weights:
            raise CopyscanError(
                f"embedding queries for a {NAME} index needs the CLIP image encoder its vectors came "
                "from: as TorchScript, weights=/models/clip-vit-l-14-visual.torchscript.pt, or an open_clip "
                f"checkpoint, weights=/models/open_clip_model.safetensors ({CLIP_EXTRA}); nothing is downloaded"
            )
        local = fetch_weights(weights)
        self.device = pick_device(device)
        suffix = os.path.splitext(local)[1].lower()
        tower, why = None, ""
        if suffix not in OPEN_CLIP_SUFFIXES:
            try:
                tower = sscd.load_torchscript(local, self.device)
            except CopyscanError:
                if suffix not in TORCH_SAVE_SUFFIXES:
                    raise
                why = " (not TorchScript)"
        if tower is not None:
            module = sscd.SSCDModule(tower, CLIP_MEAN, CLIP_STD)
        else:
            model, cfg = load_open_clip(local, weights, spec["model"], spec.get("pretrained"), why)
            spec["preprocess"], spec["normalise"] = open_clip_preprocess(cfg)
            size = spec["preprocess"]["size"]
            if "size" in (options or {}) and options["size"] != size:
                raise CopyscanError(
                    f"open_clip's {spec['model']} takes {size}-pixel images, but embedder_options size is "
                    f"{options['size']}: an index of this model's vectors is imported with size: {size}"
                )
            module = sscd.SSCDModule(EncodeImage(model), spec["normalise"]["mean"], spec["normalise"]["std"])
        self.module = module.eval().to(self.device)
        spec["dim"] = sscd.probe_dim(self.module, spec["preprocess"]["size"], self.device)
        self.spec = spec
        self.weights_sha256 = weights_digest(local, os.path.getmtime(local))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__
