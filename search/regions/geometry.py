"""Box geometry of partial-copy search: frames implied by (window, region) pairs, sliding windows, IoU.

Boxes are (x0, y0, x1, y1) fractions of an image's width and height; (0, 0, 1, 1) is the whole image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# an image's frame is the median of the frames its best REFINE_PAIRS pairs imply (one pair alone is off by
# the region grid's coarseness: median IoU with the pasted object 0.63 for one pair, 0.73 for 8, measured on
# bench/partial_copies.py's queries); crops narrower than MIN_CROP of a side, or overlapping the whole query
# or an earlier crop of the same query by IoU >= CROP_IOU, are not embedded
REFINE_PAIRS = 8
MIN_CROP = 0.05
CROP_IOU = 0.8
# sliding windows: neighbours SLIDE_STEP of the side apart (the last one flush with the far edge), at most
# SLIDE_MAX_AXIS along an axis (then evenly spread), so an extreme panorama costs a bounded number of crops
SLIDE_STEP = 0.34
SLIDE_MAX_AXIS = 12


def frames(query_boxes: np.ndarray, train_boxes: np.ndarray) -> np.ndarray:
    """(n, 4) query boxes matched to (n, 4) training-image boxes → (n, 4): where the whole training image
    (box (0, 0, 1, 1)) lies in the query, if the query box shows that training box scaled along each axis
    by the ratio of their sides. Not clipped."""
    q = np.asarray(query_boxes, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(train_boxes, dtype=np.float64).reshape(-1, 4)
    sx = (q[:, 2] - q[:, 0]) / (t[:, 2] - t[:, 0])
    sy = (q[:, 3] - q[:, 1]) / (t[:, 3] - t[:, 1])
    x0, y0 = q[:, 0] - t[:, 0] * sx, q[:, 1] - t[:, 1] * sy
    return np.stack([x0, y0, x0 + sx, y0 + sy], axis=1).astype(np.float32)


def _positions(extent: float) -> np.ndarray:
    """Starts (fractions) of windows ``extent`` wide along one axis of length 1 (``SLIDE_STEP`` apart)."""
    room = 1.0 - extent
    if room <= 1e-9:
        return np.zeros(1)
    starts = np.append(np.arange(0.0, room - 1e-9, SLIDE_STEP * extent), room)
    return starts if len(starts) <= SLIDE_MAX_AXIS else np.linspace(0.0, room, SLIDE_MAX_AXIS)


def slide_boxes(sizes: Sequence[float | tuple[float, float]], width: int, height: int) -> np.ndarray:
    """The sliding windows of a ``width`` × ``height`` px query: for every size in ``sizes`` (a side, or a
    (width, height) pair, fractions of its shorter side), squares (rectangles) in its pixels, row by row
    → (n, 4) float32 fractions x0, y0, x1, y1."""
    short = min(width, height)
    out = []
    for size in sizes:
        sw, sh = (size, size) if np.isscalar(size) else size
        w, h = sw * short / width, sh * short / height
        for y in _positions(h):
            out.extend((x, y, x + w, y + h) for x in _positions(w))
    return np.asarray(out, dtype=np.float32).reshape(-1, 4)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when their union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
