"""Dense verification of partial-copy candidates: where, and how clearly, a training image sits in a generation.

Region matching (``copyscan.search.regions``) proposes, for each generation, its best training images by
pooled descriptors of windows. A pooled descriptor of a window that is only roughly on a pasted object is a
weak cue, and the maximum over many windows favours wrong images as often as the right one. This stage checks
each proposed image against the generation cell by cell instead:

- the training image T is resized so its longer side is ``template_side`` px and run through
  EfficientNet-Lite0 up to block 10 (stride 16, 112 channels): the *template*, a (112, h, w) map whose
  cells are L2-normalised;
- the generation G is resized so that T, pasted with its longer side at a fraction f of G's shorter side,
  would be ``template_side`` px long: G's shorter side is ``template_side / f``, for each f of
  ``fractions`` (0.25–0.72). One map per f (a pyramid), computed once per generation for all its
  candidates;
- at each f the template is slid over the level (cross-correlation: the mean cosine of aligned cells at
  every offset), giving a map c; its peak-to-sidelobe ratio ``z = (max c - mean c) / std c`` (Bolme et al.
  2010) says by how many standard deviations the best placement stands out from all the others;
- ``dense_z`` is the largest z over the levels, and ``dense_box`` the placement it came from, in the
  generation's [0, 1] coordinates.

Why z and not the peak itself: cells of a CNN feature map are all positively correlated, so the mean
cosine at the best offset is high for any pair of images (0.7 at the median for wrong candidates on the
partial-copy bench, as for the right ones). The peak of a real copy stands out from the rest of its own
map; a wrong image's map is flat. A level where the template fits at fewer than ``MIN_POSITIONS``
offsets gives no z (its mean and spread are meaningless), so fractions stop well below 1: objects that
fill most of the generation are what the global descriptor and region frames find.

The verified candidates of a generation are ranked by ``dense_z`` (``dense_rank``, 0 = best): their z
come from the same generation's maps, so they compare directly, and on the partial-copy bench the source
had the highest z for every copy whose source was among the candidates (98 of 120). Across generations z
is less comparable (a busy scene gives every wrong image a higher peak than a flat one), so the
confidence of a generation's answer is ``dense_score = local_score_norm + weight * dense_z``, which adds
the region score's normalisation against the background. Both are null where a candidate was not
verified. Cost per generation: one forward pass per level (the largest is the generation at
``template_side / min(fractions)`` px on its shorter side) and one per candidate.
"""

from __future__ import annotations

import functools
import math
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from copyscan.indexing.embed.decode import DecodeLimits, Rejected, decode_image
from copyscan.indexing.models.descriptor import IMAGENET_MEAN, IMAGENET_STD
from copyscan.indexing.models.effnet import EfficientNetLite0, load_efficientnet_lite0
from copyscan.indexing.models.preprocess import resize_short_edge_rgb
from copyscan.indexing.read.fetch import Fetched, fetch_images
from copyscan.indexing.store import storage
from copyscan.search.results.matches import with_columns
from copyscan.search.verify.matches import (
    PairFailures,
    Request,
    count_reasons,
    decode_all,
    pair_requests,
    query_groups,
    seconds,
    timed,
    train_ranges,
)

TAP = 10  # EfficientNet-Lite0 block 10: (112, H/16, W/16)
STRIDE = 16
MIN_POSITIONS = 25  # offsets a level needs for its z (mean and std of the correlation map)
DEFAULT_FRACTIONS = (0.25, 0.3, 0.35, 0.42, 0.5, 0.6, 0.72)
MAX_SIDE = 2048  # a level's longer side is capped here (very wide generations at small fractions)


@dataclass(frozen=True)
class DenseSpec:
    """Verify each generation's region candidates of ``local_rank < ranks``; ``weight`` scales z into
    ``dense_score``; ``weights``: EfficientNet-Lite0 state dict (None = the packaged one)."""

    ranks: int = 10
    weight: float = 0.05
    template_side: int = 224
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    weights: str | None = None
    threads: int = 8
    limits: DecodeLimits = DecodeLimits()
    fetch_pairs: int = 512  # pairs whose images are fetched and held at once (whole generations)

    def problems(self) -> list[str]:
        out = []
        if self.ranks < 0:
            out.append("dense_verify must be >= 0")
        if self.weight < 0:
            out.append("dense_weight must be >= 0")
        if self.template_side < STRIDE * 4 or self.template_side % STRIDE:
            out.append(f"dense template side must be a multiple of {STRIDE} and >= {STRIDE * 4}")
        if not self.fractions or any(not 0 < f < 1 for f in self.fractions):
            out.append("dense fractions must be in (0, 1)")
        return out


@functools.lru_cache(maxsize=2)
def _backbone(weights: str | None) -> EfficientNetLite0:
    """The network, loaded once per process (Ray reuses a task's worker process for the next chunks)."""
    return load_efficientnet_lite0(weights)


class DenseMatcher:
    """Feature maps and their correlation (module docstring)."""

    def __init__(self, spec: DenseSpec, model: EfficientNetLite0 | None = None):
        self.spec = spec
        self.model = model if model is not None else _backbone(spec.weights)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0

    @torch.inference_mode()
    def feature_map(self, img: Image.Image, short: int, max_side: int = MAX_SIDE) -> torch.Tensor:
        """``img`` with its shorter side resized to ``short`` px (longer side at most ``max_side``) → its
        (112, ceil(H/16), ceil(W/16)) block-10 map, each cell L2-normalised."""
        rgb = resize_short_edge_rgb(img, short, max_side)
        x = torch.from_numpy(rgb).float()[None]
        tapped, _ = self.model.forward_stages((x - self.mean) / self.std, (TAP,), head=False)
        return F.normalize(tapped[0][0], dim=0)

    def template(self, img: Image.Image) -> torch.Tensor:
        """The training image's map, its longer side at ``template_side`` px (aspect kept)."""
        side = self.spec.template_side
        short = max(STRIDE, math.ceil(side * min(img.size) / max(img.size)))
        return self.feature_map(img, short, max_side=side)

    def pyramid(self, img: Image.Image) -> list[torch.Tensor]:
        """The generation's maps, one per fraction f: its shorter side at template_side / f px."""
        return [self.feature_map(img, round(self.spec.template_side / f)) for f in self.spec.fractions]

    @staticmethod
    def match(pyramid: list[torch.Tensor], template: torch.Tensor) -> tuple[float, list[float]] | None:
        """Best ``(z, box)`` of ``template`` over the levels of ``pyramid`` (box: x0, y0, x1, y1 fractions of
        the generation); None when it fits at MIN_POSITIONS offsets on no level."""
        _, th, tw = template.shape
        best: tuple[float, list[float]] | None = None
        for level in pyramid:
            _, h, w = level.shape
            if h < th or w < tw or (h - th + 1) * (w - tw + 1) < MIN_POSITIONS:
                continue
            corr = F.conv2d(level[None], template[None])[0, 0] / (th * tw)
            std = float(corr.std())
            if not std > 0:
                continue  # a flat map: no placement stands out
            z = (float(corr.max()) - float(corr.mean())) / std
            if best is None or z > best[0]:
                y, x = divmod(int(corr.argmax()), corr.shape[1])
                best = (z, [x / w, y / h, (x + tw) / w, (y + th) / h])
        return best


def _decode(fetched: Fetched, limits: DecodeLimits) -> Image.Image | tuple[str, str]:
    """A re-fetched image decoded (within ``limits``), or (reason, detail) why not."""
    if fetched.data is None:
        return fetched.reason or "no_image", fetched.detail
    try:
        return decode_image(fetched.data, limits)  # fully decoded: truncation is caught here
    except Rejected as rej:
        return rej.reason, rej.detail


def verify_dense(
    table: pa.Table,
    manifest: dict[str, Any],
    index_url: str,
    spec: DenseSpec,
    storage_options: storage.StorageOptions | None = None,
    matcher: DenseMatcher | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Dense-verify the rows of ``local_rank < spec.ranks`` in ``table`` (MATCHES_SCHEMA columns).

    Images are fetched and decoded for at most ``spec.fetch_pairs`` pairs (whole generations) at a time.
    Returns the table with ``dense_rank``, ``dense_z``, ``dense_box``, ``dense_score`` and ``dense_error``
    set (null where not verified; ``dense_error`` says why a selected row could not be), and counts:
    ``dense_pairs`` (selected), ``dense_verified``, ``dense_no_fit`` (the template fits no level of the
    generation), ``dense_errors`` ({reason: count}), ``dense_error_examples`` and ``dense_seconds``.
    """
    t0 = time.perf_counter()
    local_rank = np.asarray(table["local_rank"].to_numpy(zero_copy_only=False), dtype=np.float64)
    rows = np.nonzero(local_rank < spec.ranks)[0]  # NaN (found only globally) is never selected
    run = _DenseRun(table.num_rows, spec)
    if len(rows):
        run.measure(table, rows, manifest, index_url, storage_options, matcher or DenseMatcher(spec))
    done = np.isfinite(run.z)
    local_norm = np.asarray(table["local_score_norm"].to_numpy(zero_copy_only=False), dtype=np.float32)
    score = local_norm + np.float32(spec.weight) * run.z
    rank = _dense_ranks(table["query_id"].to_pylist(), run.z)
    table = with_columns(
        table,
        {
            "dense_rank": pa.array(rank, pa.int32(), mask=rank < 0),
            "dense_z": pa.array(run.z, pa.float32(), mask=~done),
            "dense_box": pa.array(run.boxes, pa.list_(pa.float32(), 4)),
            "dense_score": pa.array(score, pa.float32(), mask=~np.isfinite(score)),
            "dense_error": pa.array(run.failures.errors, pa.string()),
        },
    )
    stats = {
        "dense_pairs": len(rows),
        "dense_verified": int(done.sum()),
        "dense_no_fit": run.no_fit,
        "dense_errors": count_reasons(run.failures.errors),
        "dense_error_examples": run.failures.examples,
        "dense_seconds": seconds(run.timings, t0),
    }
    return table, stats


def _dense_ranks(query_ids: list[Any], z: np.ndarray) -> np.ndarray:
    """(n,) int32 rank of each verified row (finite ``z``, (n,) float32) among its generation's (same
    ``query_ids`` entry) by ``z``, 0 = highest; ties in the table's order; -1 where not verified."""
    rank = np.full(len(z), -1, dtype=np.int32)
    by_query: dict[Any, list[int]] = defaultdict(list)
    for r in np.nonzero(np.isfinite(z))[0].tolist():
        by_query[query_ids[r]].append(r)
    for verified in by_query.values():
        order = sorted(verified, key=lambda r: (-float(z[r]), r))
        rank[order] = np.arange(len(order), dtype=np.int32)
    return rank


class _DenseRun:
    """The dense matching of one table's pairs: images fetched and decoded for a group of whole generations
    at a time (``spec.fetch_pairs`` pairs at most), each generation's pyramid computed once for its candidates.

    Fills, per row of the table: ``z`` ((n,) float32, NaN where not matched), ``boxes`` (x0, y0, x1, y1 or
    None) and ``failures``; ``no_fit`` counts the pairs whose template fits no level."""

    def __init__(self, n: int, spec: DenseSpec):
        self.spec = spec
        self.z = np.full(n, np.nan, dtype=np.float32)
        self.boxes: list[list[float] | None] = [None] * n
        self.failures = PairFailures.of(n)
        self.timings = {"fetch": 0.0, "features": 0.0}
        self.no_fit = 0
        self.train_req: dict[int, Request] = {}
        self.query_req: dict[int, Request] = {}
        self.ranges: dict[Request, tuple[int, int]] = {}

    def measure(
        self,
        table: pa.Table,
        rows: np.ndarray,
        manifest: dict[str, Any],
        index_url: str,
        storage_options: storage.StorageOptions | None,
        matcher: DenseMatcher,
    ) -> None:
        """Match the pairs of ``rows`` ((m,) int64 row numbers of ``table``)."""
        self.train_req, self.query_req = pair_requests(table, rows, manifest, index_url)
        self.ranges = train_ranges(table, rows, self.train_req, index_url, storage_options)
        with ThreadPoolExecutor(max_workers=max(1, self.spec.threads)) as pool:
            for group in query_groups(rows.tolist(), self.query_req, self.spec.fetch_pairs):
                with timed(self.timings, "fetch"):
                    decoded = self._fetch(pool, group, storage_options)
                with timed(self.timings, "features"):
                    self._match_group(matcher, group, decoded)
                del decoded  # before the next group is fetched

    def _fetch(
        self, pool: ThreadPoolExecutor, group: list[int], storage_options: storage.StorageOptions | None
    ) -> dict[Request, Image.Image | tuple[str, str]]:
        """The images of ``group`` (rows), fetched and decoded: {request: image, or (reason, detail)}."""
        wanted = sorted({*(self.train_req[r] for r in group), *(self.query_req[r] for r in group)}, key=str)
        fetched = fetch_images(wanted, storage_options, self.spec.threads, ranges=self.ranges)
        return decode_all(pool, wanted, lambda req: _decode(fetched[req], self.spec.limits))

    def _match_group(
        self, matcher: DenseMatcher, group: list[int], decoded: dict[Request, Image.Image | tuple[str, str]]
    ) -> None:
        """Match the pairs of ``group``, generation by generation; a template is computed once per group."""
        templates: dict[Request, torch.Tensor] = {}
        by_query: dict[Request, list[int]] = defaultdict(list)
        for r in group:
            by_query[self.query_req[r]].append(r)
        for query_req, pairs in by_query.items():
            query = decoded[query_req]
            if not isinstance(query, Image.Image):  # not decoded: each of its pairs fails with the reason
                for r in pairs:
                    self.failures.add(r, f"query_{query[0]}", query[1], self.train_req[r], query_req)
                continue
            self._match_query(matcher, query, pairs, decoded, templates)

    def _match_query(
        self,
        matcher: DenseMatcher,
        query: Image.Image,
        pairs: list[int],
        decoded: dict[Request, Image.Image | tuple[str, str]],
        templates: dict[Request, torch.Tensor],
    ) -> None:
        """Match one generation's candidates ``pairs`` (rows) against its pyramid."""
        pyramid = matcher.pyramid(query)
        for r in pairs:
            train_req = self.train_req[r]
            train = decoded[train_req]
            if not isinstance(train, Image.Image):
                self.failures.add(r, f"train_{train[0]}", train[1], train_req, self.query_req[r])
                continue
            if train_req not in templates:
                templates[train_req] = matcher.template(train)
            found = matcher.match(pyramid, templates[train_req])
            if found is None:
                self.no_fit += 1
            else:
                self.z[r], self.boxes[r] = found
