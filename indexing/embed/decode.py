"""Decode samples into fixed-size uint8 pixel batches on CPU, recording every rejection with its reason.

This is the CPU half of embedding: its output (``DecodedBatch``) is small and uniform, so it travels
cheaply through Ray's object store to the (GPU) embedding actors. A bad image never raises: it becomes
a rejection record ``{"key", "reason", "detail"}`` that ends up in the shard's stats.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from copyscan.indexing.embed.augment import copy_augment, key_seed
from copyscan.indexing.embed.provenance import provenance
from copyscan.indexing.read.reader import Sample
from copyscan.indexing.runtime.deadline import DeadlineExceeded, time_limit

# Stable rejection codes (stats count them by code).
MISSING_IMAGE = "missing_image"
UNREADABLE = "unreadable_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
TOO_LARGE = "too_large"
TOO_SMALL = "too_small"
DECODE_ERROR = "decode_error"
EMPTY = "empty_file"
TIMEOUT = "decode_timeout"
UNSUPPORTED = "unsupported_format"

# Formats Pillow may open, chosen by content (never by name): all it registers but EPS, whose plugin hands
# the file to Ghostscript, an interpreter of the PostScript language, which untrusted input should not reach.
# EPS files are rejected as unsupported_format.
REFUSED_FORMATS = ("EPS",)

# ``decode_image`` with ``draft``: the key of ``Image.info`` that keeps a reduced JPEG's size on file
STORED_SIZE = "copyscan_stored_size"

# (3, S, S) uint8 from a decoded RGB/RGBA/L image ((3, H, W) for an aspect-keeping preprocessing).
Preprocess = Callable[[Image.Image], np.ndarray]


@dataclass(frozen=True)
class DecodeLimits:
    """Images outside these bounds are rejected before any pixel is decoded."""

    max_pixels: int = 64_000_000
    min_side: int = 8
    # wall-clock seconds one image may take to open and decode (``copyscan.indexing.runtime.deadline``): a
    # crafted file can keep a decoder busy for minutes
    max_seconds: float = 20.0


@dataclass
class DecodedBatch:
    """Up to ``batch_size`` decoded images of one source (shard or query chunk).

    pixels: (n, 3, S, S) uint8, RGB; a list of n (3, H, W) uint8 arrays where the preprocessing keeps each
    image's aspect (sscd ``resize=short_edge``) and the shapes differ.
    records: n metadata dicts, aligned with ``pixels`` (key, url, caption, width, height, ...).
    rejections: the samples of this stretch that could not be used, with reasons.
    """

    pixels: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    # Augmented copies of some of the source's images (``PairSpec``), for learned whitening: pair_pixels
    # (m, 3, S, S) uint8 (or a list, like pixels) and pair_rows (m,) the row (accepted-image index in the
    # source) each one copies.
    pair_pixels: np.ndarray | None = None
    pair_rows: np.ndarray | None = None
    # images whose augmented copies could not be made ({"key", "detail"}); the image itself is still indexed
    pair_errors: list[dict[str, Any]] = field(default_factory=list)
    # The same images preprocessed a second time at another size (query windows for partial copies,
    # ``copyscan.indexing.models.regions``): (n, 3, S', S') uint8, aligned with ``pixels``.
    region_pixels: np.ndarray | None = None
    # The decode task's own seconds making this batch (reading and decoding; not its waits for the model to
    # take the batches before it): what one decode task costs per image, beside the model's cost per image
    # (``copyscan.indexing.embed.fanout``). Set by ``decode_ray``; 0 where batches are decoded in-process.
    decode_seconds: float = 0.0
    # ... and the seconds of them that its thread ran or waited for a core (``thread_core_seconds``): below
    # decode_seconds where reading waits on storage
    decode_cpu_seconds: float = 0.0


@dataclass(frozen=True)
class PairSpec:
    """Which images of a source also get augmented copies: the first ``images`` accepted ones, ``copies``
    copies each (``copyscan.indexing.embed.augment.copy_augment``, seeded by (seed, shard, the key's
    ``key_seed``, copy), so an image's copies do not depend on its position in the shard)."""

    images: int = 0
    copies: int = 2
    seed: int = 0
    shard: int = 0


def pair_quota(pair_images: int, n_shards: int, shard: int) -> int:
    """How many of ``shard``'s first images get augmented copies: ``pair_images`` spread evenly over the
    shards (each gets ⌊·⌋ or ⌈·⌉ of pair_images / n_shards; with more shards than pair images, evenly
    spaced shards get one each), so the total is ``pair_images`` however many shards there are."""
    n = max(n_shards, 1)
    return (shard + 1) * pair_images // n - shard * pair_images // n


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, limits: DecodeLimits, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` fully (so truncation is detected here, not later); raise Rejected with a reason.

    With ``draft=(w, h)``, a JPEG is decoded once at the smallest DCT reduction (1/2, 1/4 or 1/8) that
    keeps it at least ``w × h`` (``Image.draft``), which is several times cheaper than a full decode of a
    large file; the whole stream is still read, so truncation is still detected. The limits apply to the
    stored size, before any pixel is decoded. Other formats ignore ``draft``.
    """
    if not data:
        raise Rejected(EMPTY, "0 bytes")
    try:
        with warnings.catch_warnings(), time_limit(limits.max_seconds):
            # Size is checked against our own limit below; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=open_formats())
            width, height = img.size
            if width * height > limits.max_pixels:
                raise Rejected(TOO_LARGE, f"{width}x{height} exceeds max_pixels={limits.max_pixels}")
            if min(width, height) < limits.min_side:
                raise Rejected(TOO_SMALL, f"{width}x{height} is below min_side={limits.min_side}")
            if draft is not None and img.format == "JPEG":
                img.draft("RGB", draft)
                if img.size != (width, height):
                    img.info[STORED_SIZE] = (width, height)  # the size on file, which the image no longer has
            img.load()
    except Rejected:
        raise
    except Image.DecompressionBombError as exc:
        raise Rejected(TOO_LARGE, str(exc)) from None
    except DeadlineExceeded as exc:
        raise Rejected(TIMEOUT, f"{exc} (max_seconds={limits.max_seconds:g})") from None
    except UnidentifiedImageError:
        refused = _refused_format(data)
        if refused is not None:
            raise Rejected(UNSUPPORTED, f"{refused} is not opened (it would run an interpreter)") from None
        raise Rejected(NOT_AN_IMAGE, f"{len(data)} bytes not recognised as an image") from None
    except OSError as exc:
        message = str(exc)
        reason = TRUNCATED if "truncated" in message or "broken data stream" in message else DECODE_ERROR
        raise Rejected(reason, message) from None
    except Exception as exc:  # PIL raises a zoo of errors on malformed files (SyntaxError, ValueError, ...)
        raise Rejected(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None
    return img


def open_formats() -> list[str]:
    """The formats ``decode_image`` lets Pillow open: every registered one but ``REFUSED_FORMATS``."""
    Image.init()
    return [f for f in Image.OPEN if f not in REFUSED_FORMATS]


def _refused_format(data: bytes) -> str | None:
    """The refused format ``data`` is in (its plugin's own check of the header), or None."""
    for name in REFUSED_FORMATS:
        accept = Image.OPEN.get(name, (None, None))[1]
        if accept is not None and accept(data[:16]):
            return name
    return None


def _record(sample: Sample, img: Image.Image) -> dict[str, Any]:
    meta = sample.meta
    width, height = img.info.get(STORED_SIZE, img.size)
    record: dict[str, Any] = {
        "key": sample.key,
        "url": sample.url,
        "caption": sample.caption,
        "width": width,
        "height": height,
    }
    for name in ("original_width", "original_height", "sha256"):
        if name in meta:
            record[name] = meta[name]
    if sample.image_offset is not None and sample.image is not None:  # fetched back with one ranged read
        record["tar_offset"], record["tar_size"] = sample.image_offset, len(sample.image)
    record.update(provenance(meta))
    # generations (scan queries): the prompt they were made from, when their JSON sidecar names it
    if isinstance(meta.get("prompt"), str):
        record["prompt"] = meta["prompt"]
    # The image is indexed even when its JSON sidecar is broken; the problem is kept with the record.
    record["metadata_error"] = sample.problem
    return record


class _BatchBuilder:
    """The batch ``decode_samples`` is filling: accepted images, rejections and augmented copies."""

    def __init__(self, image_size: int | None, with_regions: bool) -> None:
        # the shape of an empty batch's pixels: the last accepted image's, else the embedder's input size
        self.shape: tuple[int, ...] | None = (3, image_size, image_size) if image_size else None
        self.with_regions = with_regions
        self._clear()

    def _clear(self) -> None:
        self.pixels: list[np.ndarray] = []
        self.region_pixels: list[np.ndarray] = []
        self.records: list[dict[str, Any]] = []
        self.rejections: list[dict[str, Any]] = []
        self.pair_pixels: list[np.ndarray] = []
        self.pair_rows: list[int] = []
        self.pair_errors: list[dict[str, Any]] = []

    def reject(self, key: str, reason: str, detail: str) -> None:
        self.rejections.append({"key": key, "reason": reason, "detail": detail})

    def accept(self, array: np.ndarray, region_array: np.ndarray | None, record: dict[str, Any]) -> None:
        if array.dtype != np.uint8 or array.ndim != 3:
            raise TypeError(f"preprocess must return (3, S, S) uint8, got {array.dtype} {array.shape}")
        self.shape = array.shape
        self.pixels.append(array)
        if region_array is not None:
            self.region_pixels.append(region_array)
        self.records.append(record)

    def add_copies(
        self, img: Image.Image, preprocess: Preprocess, pairs: PairSpec, key: str, row: int
    ) -> None:
        """``pairs.copies`` augmented copies of accepted image ``row``; a failure is noted, not raised."""
        try:
            copies = _augmented(img, preprocess, pairs, key)
        except Exception as exc:  # an odd image the augmentation cannot handle: index it, note it
            self.pair_errors.append({"key": key, "detail": f"{type(exc).__name__}: {exc}"})
        else:
            self.pair_pixels.extend(copies)
            self.pair_rows.extend([row] * pairs.copies)

    def has_content(self) -> bool:
        return bool(self.pixels or self.rejections or self.pair_errors)

    def flush(self) -> DecodedBatch:
        """The batch so far; the builder starts a new one."""
        if self.pixels:
            stacked = stack_pixels(self.pixels)
        else:
            stacked = np.zeros((0, *(self.shape or (3, 0, 0))), dtype=np.uint8)
        batch = DecodedBatch(stacked, self.records, self.rejections, pair_errors=self.pair_errors)
        if self.pair_pixels:
            batch.pair_pixels = stack_pixels(self.pair_pixels)
            batch.pair_rows = np.asarray(self.pair_rows, dtype=np.int64)
        if self.with_regions:
            batch.region_pixels = np.stack(self.region_pixels) if self.region_pixels else None
        self._clear()
        return batch


def decode_samples(
    samples: Iterable[Sample],
    preprocess: Preprocess,
    batch_size: int,
    limits: DecodeLimits = DecodeLimits(),
    image_size: int | None = None,
    pairs: PairSpec | None = None,
    region_preprocess: Preprocess | None = None,
    draft: int | None = None,
) -> Iterator[DecodedBatch]:
    """Group ``samples`` into DecodedBatch objects of at most ``batch_size`` accepted images.

    Rejections are attached to the batch in which they occurred; a final batch may hold only rejections
    (``pixels`` then has 0 rows), so no rejection is ever lost. With ``pairs``, the batches also carry
    augmented copies of the source's first ``pairs.images`` accepted images; with ``region_preprocess``,
    every accepted image preprocessed by it too (``region_pixels``). With ``draft`` (pixels; never with
    ``pairs``), JPEGs are decoded at the smallest DCT scale that keeps both sides at least ``draft``
    (``decode_image``): the largest input size the preprocessing needs.
    """
    if draft is not None and pairs is not None:
        raise ValueError("draft decoding is for queries; augmented copies are made from full-size images")
    batch = _BatchBuilder(image_size, region_preprocess is not None)
    accepted = 0
    for sample in samples:
        if sample.image is None:
            batch.reject(sample.key, *_missing_image(sample))
            continue
        try:
            img, array, region_array = _decode_sample(
                sample.image, limits, preprocess, region_preprocess, draft
            )
        except Rejected as rej:
            batch.reject(sample.key, rej.reason, rej.detail)
            continue
        batch.accept(array, region_array, _record(sample, img))
        if pairs is not None and accepted < pairs.images:
            batch.add_copies(img, preprocess, pairs, sample.key, accepted)
        accepted += 1
        if len(batch.pixels) >= batch_size:
            yield batch.flush()
    if batch.has_content():
        yield batch.flush()


def _missing_image(sample: Sample) -> tuple[str, str]:
    """(reason, detail) of a sample without an image: the reader's problem, or no image member."""
    if sample.problem is not None:
        reason, _, detail = sample.problem.partition(": ")
        return reason, detail or sample.problem
    return MISSING_IMAGE, "no image member"


def _decode_sample(
    data: bytes,
    limits: DecodeLimits,
    preprocess: Preprocess,
    region_preprocess: Preprocess | None,
    draft: int | None = None,
) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
    """(image, its pixels, its region pixels or None); raise Rejected with the reason it cannot be used."""
    try:
        img = decode_image(data, limits, None if draft is None else (draft, draft))
        array = preprocess(img)
        region_array = region_preprocess(img) if region_preprocess is not None else None
    except Rejected:
        raise
    except Exception as exc:  # a preprocessing failure on a legal but odd image (e.g. mode "I;16")
        raise Rejected(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None
    return img, array, region_array


def stack_pixels(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """(n, 3, H, W) when the n arrays share one shape (always, for a fixed-size preprocessing); else the
    arrays as a list: an aspect-keeping preprocessing is neither padded nor cropped here."""
    first = arrays[0].shape
    return np.stack(arrays) if all(a.shape == first for a in arrays) else list(arrays)


def _augmented(img: Image.Image, preprocess: Preprocess, pairs: PairSpec, key: str) -> list[np.ndarray]:
    out = []
    for copy in range(pairs.copies):
        rng = np.random.default_rng([pairs.seed, pairs.shard, key_seed(key), copy])
        out.append(preprocess(copy_augment(img, rng)))
    return out


def timed_batches(batches: Iterable[DecodedBatch]) -> Iterator[DecodedBatch]:
    """``batches``, each with ``decode_seconds`` set to the time its making took, from the generator's
    resuming to its next batch, and ``decode_cpu_seconds`` to the part of it on a core or waiting for one
    (``thread_core_seconds``). A decode task (``decode_ray``, a Ray streaming generator) is paused at each
    ``yield`` while the actor is ``PREFETCH_BATCHES`` behind, so that wait is not counted: the sums are the
    task's own work, its cost an image, and how much of it needs a core (``copyscan.indexing.embed.fanout``)."""
    t0, c0 = time.perf_counter(), thread_core_seconds()
    for batch in batches:
        batch.decode_seconds = time.perf_counter() - t0
        batch.decode_cpu_seconds = thread_core_seconds() - c0
        yield batch
        t0, c0 = time.perf_counter(), thread_core_seconds()


def thread_core_seconds() -> float:
    """Seconds this thread has run or waited in a run queue for a core (Linux's schedstat), so that a task
    slowed by busy cores does not look like one waiting on storage; its CPU seconds where that is not
    available."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run, wait = f.read().split()[:2]
        return (int(run) + int(wait)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()
