"""Region descriptors for partial copies: several vectors per image, each a box of the image.

A training image gets the whole image plus grids of overlapping boxes (``TRAIN_GRID``); a query gets the
whole image plus denser, smaller windows of several shapes (``QUERY_GRID``), computed on a larger input
(``QUERY_SIZE``) so that an object covering ~40 % of a generation is seen at about the scale the
training image was embedded at. A box is pooled from the feature maps of *one* forward pass
(``CopyDescriptor.pool_boxes``): the map cells whose centres fall inside the box, pooled exactly as the
global descriptor pools a whole map (GeM, R-MAC regions, per-layer L2, concatenation), so the box
(0, 0, 1, 1) is the global descriptor and every region score is a cosine.

Boxes are fractions (x0, y0, x1, y1) of the image's width and height. A grid spec is a comma-separated
list of ``S:N`` (square boxes of side S of each dimension, N × N positions evenly spaced from edge to
edge) or ``SWxSH:N`` (boxes SW wide and SH high); the whole image is always box 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from copyscan.indexing.errors import CopyscanError

Box = tuple[float, float, float, float]

WHOLE: Box = (0.0, 0.0, 1.0, 1.0)
# 1 + 4 + 9 = 14 vectors per training image (the partial-copy issue allows at most 16)
TRAIN_GRID = "0.6:2,0.45:3"
# 1 + 49 + 64 + 81 = 195 windows, each one forward pass. Measured on bench/partial_copies.py's queries
# (objects of 35-50 % of the scene): windows that lie inside the object match, larger ones do not, and
# 35 / 148 / 195 / 301 windows gave recall@1 0.52 / 0.61 / 0.62 / 0.65 and AP 0.41 / 0.51 / 0.57 / 0.56
# (exact search of 200 queries' windows, region densities on);
# objects larger than the windows are still found, by the training images' 0.6 and 0.45 regions
QUERY_GRID = "0.3:7,0.25:8,0.2:9"
QUERY_SIZE = 448
# Query windows pooled from one pass (``RegionSpec`` mode "rmac", ``ScanConfig.region_query_mode=pool``):
# the generation is preprocessed at POOL_QUERY_SIZE px and every window pooled from that pass's feature
# maps; at 672 px a 0.3 window spans about as many map cells as the 224-px crop of it does
POOL_QUERY_SIZE = 672
# ``region_query_mode=hybrid``: the windows pooled from one pass at HYBRID_QUERY_SIZE px only *select*; the
# HYBRID_CROPS windows of a generation whose pooled vectors found the best normalised hit are cut out and
# embedded like images (``copyscan.search.regions.windows.LocalWindows.search``), and their hits replace the
# pooled ones (README "Windows pooled from one pass")
HYBRID_QUERY_SIZE = 576
HYBRID_CROPS = 8
MAX_TRAIN_REGIONS = 64
MODES = ("crop", "pool", "rmac")
# ScanConfig.region_query_mode → RegionSpec mode of the query windows
QUERY_MODES = {"pool": "rmac", "hybrid": "rmac", "crop": "crop"}


def query_mode(
    manifest: dict[str, Any], mode: str, size: int = 0, split_product: bool = False
) -> tuple[str, int]:
    """(RegionSpec mode, px) of the query windows of a scan of the index ``manifest`` describes, for
    ``ScanConfig.region_query_mode`` ``mode`` and ``region_query_size`` ``size`` (0 = default): "pool"
    and "hybrid" pool them from one pass ("rmac", at ``POOL_QUERY_SIZE`` / ``HYBRID_QUERY_SIZE`` px) where
    the embedder pools feature maps (effnet-lite0's copy-gem descriptor), else they are cropped ("crop", at
    the index's ``query_size``).
    With ``split_product`` on an index of cropped regions the default size is the regions' own (the
    aligned boxes are cut from the same pixels)."""
    if mode not in QUERY_MODES:
        raise CopyscanError(f"region_query_mode must be crop, pool or hybrid, not {mode!r}")
    described = manifest["regions"]
    pooled = QUERY_MODES[mode] == "rmac" and (manifest.get("embedder") or {}).get("descriptor") == "copy-gem"
    if not size and split_product and described.get("mode") == "crop":
        size = int(described.get("size") or 0)
    if pooled:
        default = HYBRID_QUERY_SIZE if mode == "hybrid" else POOL_QUERY_SIZE
    else:
        default = int(described.get("query_size") or QUERY_SIZE)
    return ("rmac" if pooled else "crop"), int(size or default)


def parse_slide(spec: str) -> tuple[tuple[float, float], ...]:
    """``ScanConfig.region_slide`` ("0.5,0.4,0.5x0.25"; "" = none) → the windows' (width, height), fractions
    of the query's shorter side, each in (0, 1]: ``S`` is a square of side S, ``WxH`` a rectangle (for
    pasted objects of another shape than the query's windows: a 2:1 object fills at most half a square)."""
    sizes = []
    for part in (p.strip() for p in str(spec or "").split(",")):
        if not part:
            continue
        try:
            sides = [float(v) for v in part.lower().split("x")]
        except ValueError:
            sides = []
        if len(sides) not in (1, 2):
            raise CopyscanError(
                f"bad region_slide entry {part!r} in {spec!r}: use sides like 0.5,0.4 or rectangles like "
                "0.5x0.25 (width x height)"
            )
        if not all(0 < v <= 1 for v in sides):
            raise CopyscanError(
                f"region_slide entry {part!r}: sides are fractions of the shorter side, in (0, 1]"
            )
        sizes.append((sides[0], sides[-1]))
    return tuple(sizes)


def parse_grid(spec: str) -> list[Box]:
    """Boxes of a grid spec, whole image first, duplicates dropped (order kept). See the module doc."""
    boxes: list[Box] = [WHOLE]
    for part in (p.strip() for p in str(spec or "").split(",")):
        if not part:
            continue
        try:
            size, _, count = part.partition(":")
            sw, _, sh = size.partition("x")
            width, height = float(sw), float(sh or sw)
            n = int(count or 1)
        except ValueError:
            raise CopyscanError(f"bad region grid entry {part!r} in {spec!r}: use S:N or SWxSH:N") from None
        if not (0 < width <= 1 and 0 < height <= 1 and n >= 1):
            raise CopyscanError(f"region grid entry {part!r}: sizes must be in (0, 1] and N >= 1")
        xs = np.linspace(0.0, 1.0 - width, n) if n > 1 else np.array([(1.0 - width) / 2])
        ys = np.linspace(0.0, 1.0 - height, n) if n > 1 else np.array([(1.0 - height) / 2])
        for y in ys:
            for x in xs:
                boxes.append(_round((float(x), float(y), float(x) + width, float(y) + height)))
    return list(dict.fromkeys(boxes))


def _round(box: Sequence[float]) -> Box:
    x0, y0, x1, y1 = (round(float(v), 6) for v in box)
    return (x0, y0, x1, y1)


def box_cells(box: Box, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns of an ``height`` × ``width`` feature map whose cell centres lie in ``box``
    (at least one cell each way, so a small box still pools the cell it falls in)."""
    return _span(box[1], box[3], height), _span(box[0], box[2], width)


def _span(lo: float, hi: float, n: int) -> slice:
    # cell i covers [i/n, (i+1)/n); its centre (i + 0.5)/n lies in [lo, hi) for i in [lo·n − 0.5, hi·n − 0.5)
    start = min(n - 1, max(0, int(np.ceil(lo * n - 0.5))))
    stop = max(start + 1, min(n, int(np.ceil(hi * n - 0.5))))
    return slice(start, stop)


def boxes_array(boxes: Sequence[Box]) -> np.ndarray:
    """(R, 4) float32 array of boxes (for tables and JSON)."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def check_train_boxes(boxes: Sequence[Box]) -> None:
    if not 1 <= len(boxes) <= MAX_TRAIN_REGIONS:
        raise CopyscanError(f"{len(boxes)} regions per training image; allowed 1..{MAX_TRAIN_REGIONS}")


@dataclass(frozen=True)
class RegionSpec:
    """Which region vectors an embedding pass makes, and how.

    - ``mode="crop"`` (any embedder): the image is preprocessed a second time at ``size`` px (by the
      decode workers), each box is cut from that and resized to the embedder's input size on the model's
      device, and embedded like an image; exact, one forward pass per box.
    - ``mode="pool"`` (effnet-lite0): every box is pooled from the feature maps of the pass that makes the
      global vector (``CopyDescriptor.pool_boxes``); free, but a box's vector also sees the context around
      it (receptive fields), so it matches a crop of the same content less closely.
    - ``mode="rmac"`` (effnet-lite0; query windows): the image is preprocessed a second time at ``size``
      px, like "crop", but the boxes are pooled from the feature maps of *one* forward pass over it
      (regional pooling, Tolias et al. 2016), then through the descriptor's own head (per-layer GeM,
      R-MAC, L2, concatenation) like the global vector: one pass of ``size``² pixels instead of one pass
      per box.
    """

    boxes: tuple[Box, ...]
    size: int = QUERY_SIZE
    mode: str = "crop"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CopyscanError(f"region mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    def preprocess_spec(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The embedder's preprocessing at ``size`` for the decode workers (None: nothing more to decode).

        Modes "crop" and "rmac" work on fixed-size images: an aspect-keeping preprocessing (sscd
        ``resize=short_edge``) is refused."""
        if self.mode in ("crop", "rmac") and spec.get("kind") == "short-edge":
            raise CopyscanError(
                "region vectors (regions=true) need a fixed-size input; sscd with resize=short_edge keeps each "
                "image's aspect: use the default resize=square for an index with regions"
            )
        return {**spec, "size": int(self.size)} if self.mode in ("crop", "rmac") else None
