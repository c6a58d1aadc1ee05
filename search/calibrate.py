"""Calibration: the score thresholds that give a chosen precision, estimated from the index's own images.

A sample of training images (never the ones whose augmented copies the learned whitening saw) is read back
from the index's source shards; each gets a ``copy_augment``-ed copy, embedded with the index's embedder and
searched against the whole index. Each copy gives two matches:

- its top-1 match, a true copy match when that is its source (the situation of a generation that copies a
  training image);
- its best match other than its source, scored as if the source were absent from the index and from the
  background sample (the situation of a generation that copies nothing in the training set).

With ``prevalence`` π (the share of queries that are copies), the precision of "top-1 score ≥ t" is

    precision(t) = π·P(top-1 is the source, s ≥ t) / (π·P(top-1 score ≥ t) + (1 − π)·P(best non-source ≥ t))

and its recall P(top-1 is the source, s ≥ t). For each score (``score``, ``score_norm``) the lowest
thresholds reaching 90 % and 99 % precision are kept in ``calibration.json`` next to the manifest and in
the manifest's ``calibration`` entry; ``copyscan scan`` flags ``is_copy`` with them.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from indexing import layout, storage
from indexing.augment import copy_augment, key_seed
from indexing.decode import DecodeLimits, Rejected, decode_image, stack_pixels
from indexing.embedders import load_embedder
from indexing.errors import CopyscanError
from indexing.index_ray import pair_quota
from indexing.manifest import check_embedder, load_manifest
from indexing.reader import iter_tar
from search.calibrate_partial import PARTIAL_SCAN, calibrate_partial
from search.normalise import ScoreNormaliser
from search.searcher import ShardSearcher

logger = logging.getLogger("copyscan")

CALIBRATION_NAME = "calibration.json"
PRECISIONS = (0.5, 0.8, 0.9, 0.95, 0.99)
SCORES = ("score", "score_norm")
MIN_IMAGES = 10


@dataclass(frozen=True)
class CalibrateConfig:
    """Every knob of ``copyscan calibrate``; set with a YAML file (``--config``) and/or ``key=value``."""

    index: str  # URL of a finished copyscan index
    images: int = 1_000  # training images copied (read back from the index's source shards)
    max_shards: int = 16  # source shards read at most
    prevalence: float = 0.5  # share of copies among the queries the thresholds are for
    seed: int = 1_234
    candidates: int = 100  # ANN candidates per index shard, re-ranked exactly
    nprobe: int = 0  # 0 = the index's default
    batch_size: int = 64
    weights: str | None = None  # embedder weights; None = those the index was built with
    device: str = "auto"
    cache_dir: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Partial copies (an index with a region index; search/calibrate_partial.py): ``partial`` training
    # images pasted into scenes from ``outside`` (a folder of image files not in the training set), and as
    # many outside images pasted the same way, scanned on Ray with the copyscan scan settings
    # ``partial_scan``, give the thresholds of the partial answer (dense_score of dense_rank 0 with
    # dense_verify, else local_score_norm of local_rank 0). 0 = off
    partial: int = 0
    outside: str = ""
    partial_scan: dict[str, Any] = field(default_factory=lambda: dict(PARTIAL_SCAN))

    def validate(self) -> None:
        problems = []
        if self.partial < 0:
            problems.append("partial must be >= 0 (0 = whole copies only)")
        elif self.partial and not self.outside:
            problems.append(
                f"partial={self.partial} pastes into scenes from outside the training set: give outside=URL, "
                "a folder of images that are not in the index"
            )
        fixed = sorted(set(self.partial_scan) & {"index", "queries", "out", "threshold", "partial_threshold"})
        if fixed:
            problems.append(f"partial_scan cannot set {', '.join(fixed)} (the calibration sets them)")
        if self.images < 10:
            problems.append("images must be >= 10")
        if not 0.0 < self.prevalence < 1.0:
            problems.append("prevalence must be in (0, 1)")
        if self.max_shards < 1 or self.candidates < 2 or self.batch_size < 1:
            problems.append("max_shards, batch_size must be >= 1 and candidates >= 2")
        if problems:
            raise CopyscanError("invalid calibrate config: " + "; ".join(problems))


def select_rows(
    manifest: dict[str, Any],
    images: int,
    max_shards: int,
    seed: int,
    keys_of: Callable[[int], Sequence[str]] | None = None,
) -> tuple[dict[int, np.ndarray], bool]:
    """Rows to copy, by embedding shard, seeded, spread over at most ``max_shards`` shards, and whether they
    include images the learned whitening saw copies of (only when the collection has too few others: the
    first rows of every shard are its pair images, see ``indexing.index_ray.pair_quota``).

    ``keys_of(shard)`` (the shard's keys in row order) makes the draw one of keys, not of positions: the same
    images are chosen whatever order img2dataset wrote the shard's samples in."""
    shards = [e for e in manifest["embedding_shards"] if e["count"] > 0]
    if not shards:
        raise CopyscanError("the index holds no vectors")
    learned = (manifest.get("whitening") or {}).get("kind") == "learned"
    pair_images = int(manifest.get("config", {}).get("whitening_pair_images", 0)) if learned else 0
    order = np.random.default_rng(seed).permutation(len(shards))[:max_shards]
    taken = 0
    for avoid_pairs in (True, False):
        rng = np.random.default_rng(seed)
        chosen: dict[int, np.ndarray] = {}
        taken = 0
        per_shard = -(-images // len(order))
        for i in order:
            entry = shards[int(i)]
            n_shards = len(manifest["embedding_shards"])
            first = pair_quota(pair_images, n_shards, entry["shard"]) if avoid_pairs else 0
            free = np.arange(first, entry["count"])
            if keys_of is not None:
                keys = np.asarray(keys_of(entry["shard"]), dtype=object)
                free = free[np.argsort(keys[free], kind="stable")]
            want = min(per_shard, len(free), images - taken)
            if want > 0:
                chosen[entry["shard"]] = np.sort(rng.choice(free, size=want, replace=False))
                taken += want
        if taken >= min(images, MIN_IMAGES):
            return chosen, not avoid_pairs and pair_images > 0
    raise CopyscanError(f"the index has {taken} image(s): too few to calibrate (at least {MIN_IMAGES})")


def read_back(
    index_url: str,
    manifest: dict[str, Any],
    rows: dict[int, np.ndarray],
    storage_options: storage.StorageOptions | None = None,
) -> Iterator[tuple[int, int, str, Image.Image | None, str | None]]:
    """The training images at ``rows`` ({embedding shard: rows}) read back from the index's source shards, one
    streamed read per shard: (shard, row, key, image, None), or (shard, row, key, None, why) for an image
    that cannot be decoded or is not in its shard any more."""
    entries = {e["shard"]: e for e in manifest["embedding_shards"]}
    for shard, wanted in sorted(rows.items()):
        meta_url = storage.join(index_url, entries[shard]["metadata"])
        keys = pq.read_table(io.BytesIO(storage.read_bytes(meta_url, storage_options)), columns=["key"])
        key_list = keys.column("key").to_pylist()
        row_of = {key_list[r]: int(r) for r in wanted}
        for sample in iter_tar(entries[shard]["source"], storage_options):
            row = row_of.pop(sample.key, None)
            if row is None:
                continue
            try:
                if sample.image is None:
                    raise Rejected("missing_image", "no image member")
                yield shard, row, sample.key, decode_image(sample.image, DecodeLimits()), None
            except Exception as exc:  # noted by the caller, skipped
                yield shard, row, sample.key, None, f"{type(exc).__name__}: {exc}"
            if not row_of:
                break
        for key, row in row_of.items():
            yield shard, row, key, None, "not found in the source shard"


def _copies(
    index_url: str,
    manifest: dict[str, Any],
    rows: dict[int, np.ndarray],
    embedder,
    cfg: CalibrateConfig,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Embedded copies (n, d) and their sources' packed ids (n,), reading the images from the source shards."""
    pixels: list[np.ndarray] = []
    sources: list[int] = []
    skipped: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    for shard, row, key, img, why in read_back(index_url, manifest, rows, cfg.storage_options):
        if img is None:  # a training image that cannot be read back: noted, skipped
            skipped.append({"shard": shard, "key": key, "detail": why})
            continue
        try:
            copy = copy_augment(img, np.random.default_rng([cfg.seed, shard, key_seed(key)]))
            pixels.append(embedder.preprocess(copy))
        except Exception as exc:  # or copied
            skipped.append({"shard": shard, "key": key, "detail": f"{type(exc).__name__}: {exc}"})
            continue
        sources.append(int(layout.pack_ids(shard, np.array([row]))[0]))
        if len(pixels) >= cfg.batch_size:
            vectors.append(embedder.embed(stack_pixels(pixels)))
            pixels = []
    if pixels:
        vectors.append(embedder.embed(stack_pixels(pixels)))
    if not vectors:
        raise CopyscanError("no training image could be read back from the index's source shards")
    return np.concatenate(vectors), np.asarray(sources, dtype=np.int64), skipped


def precision_recall(
    s_top: np.ndarray, correct: np.ndarray, s_other: np.ndarray, prevalence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, precision, recall) of "top-1 score ≥ t" at every observed score t."""
    thresholds = np.unique(np.concatenate([s_top, s_other]))[::-1]
    n = len(s_top)
    top_sorted = np.sort(s_top)
    correct_sorted = np.sort(s_top[correct])
    other_sorted = np.sort(s_other)

    def at_least(sorted_values: np.ndarray) -> np.ndarray:
        return (len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="left")) / n

    tp, flagged, false_unseen = at_least(correct_sorted), at_least(top_sorted), at_least(other_sorted)
    denominator = prevalence * flagged + (1.0 - prevalence) * false_unseen
    precision = np.where(denominator > 0, prevalence * tp / np.maximum(denominator, 1e-12), 1.0)
    return thresholds, precision, tp


def threshold_for(thresholds: np.ndarray, precision: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose precision reaches ``target`` (None when none does)."""
    ok = np.nonzero(precision >= target)[0]
    return float(thresholds[ok[-1]]) if len(ok) else None


def run_calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    so = cfg.storage_options
    t0 = time.time()
    manifest = load_manifest(cfg.index, so)
    if manifest["embedder"]["name"] == "laion-clip":
        raise CopyscanError(
            f"{cfg.index} was imported from precomputed embeddings: it has no images to copy for calibration; "
            "scan with threshold=<score_norm value> (or calibrate an index of the same images built from shards)"
        )
    weights = cfg.weights if cfg.weights is not None else manifest["config"].get("weights")
    embedder = load_embedder(
        manifest["embedder"]["name"], weights, cfg.device, manifest["config"].get("embedder_options") or {}
    )
    check_embedder(manifest, embedder.spec)

    def keys_of(shard: int) -> list[str]:
        entry = next(e for e in manifest["embedding_shards"] if e["shard"] == shard)
        url = storage.join(cfg.index, entry["metadata"])
        return (
            pq.read_table(io.BytesIO(storage.read_bytes(url, so)), columns=["key"]).column("key").to_pylist()
        )

    rows, overlap = select_rows(manifest, cfg.images, cfg.max_shards, cfg.seed, keys_of)
    logger.info(
        "calibrate: copying %d training images from %d shard(s)", sum(map(len, rows.values())), len(rows)
    )
    if overlap:
        logger.warning(
            "calibrate: the index is too small to keep apart the images its whitening was learned on; "
            "the thresholds are optimistic (recorded as whitening_images_reused)"
        )
    xq, sources, skipped = _copies(cfg.index, manifest, rows, embedder, cfg)
    searcher = ShardSearcher(
        cfg.index, manifest, [e["index_shard"] for e in manifest["index_shards"]], cfg.cache_dir, so
    )
    result = searcher.search(xq, 2, cfg.candidates, cfg.nprobe or int(manifest["index"].get("nprobe") or 0))
    normaliser = ScoreNormaliser(cfg.index, manifest, 1.0, so)
    norm_top = normaliser(xq, result.D, result.I)
    # the best match that is not the source, normalised as if the source were in neither index nor background
    correct = result.I[:, 0] == sources
    other = np.where(correct, 1, 0)
    rows_idx = np.arange(len(xq))
    I_other = result.I[rows_idx, other][:, None]
    D_other = result.D[rows_idx, other][:, None]
    norm_other = normaliser(xq, D_other, I_other, exclude=sources)[:, 0]
    scores = {
        "score": (result.D[:, 0], D_other[:, 0]),
        "score_norm": (norm_top[:, 0], norm_other),
    }
    report: dict[str, Any] = {
        "build_id": manifest["build_id"],
        "images": int(len(xq)),
        "skipped": skipped,
        "prevalence": cfg.prevalence,
        "seed": cfg.seed,
        "recall@1": float(correct.mean()),
        "whitening_images_reused": overlap,
        "thresholds": {},
        "table": {},
        "seconds": 0.0,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name, (top, rest) in scores.items():
        report["table"][name], report["thresholds"][name] = precision_table(
            top, correct, rest, cfg.prevalence
        )
    if cfg.partial:
        partial_rows, _ = select_rows(manifest, cfg.partial, cfg.max_shards, cfg.seed + 1, keys_of)
        report["partial"] = calibrate_partial(cfg, manifest, partial_rows)
    report["seconds"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(cfg.index, CALIBRATION_NAME), report, so)
    manifest["calibration"] = {
        k: report[k]
        for k in ("build_id", "images", "prevalence", "recall@1", "whitening_images_reused", "thresholds")
    }
    if cfg.partial:  # what a scan needs to flag partial answers, and under which settings they hold
        keys = ("copies", "negatives", "answer", "settings", "recall@1", "thresholds")
        manifest["calibration"]["partial"] = {k: report["partial"][k] for k in keys}
    manifest["calibration"]["path"] = CALIBRATION_NAME
    storage.write_json(storage.join(cfg.index, layout.MANIFEST_NAME), manifest, so)
    return report


def precision_table(
    top: np.ndarray, correct: np.ndarray, other: np.ndarray, prevalence: float
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The calibration table of one score (``precision_recall``'s arguments; NaN = no match): for each of
    ``PRECISIONS`` its threshold and recall, and the p90 / p99 thresholds by name."""
    top = np.nan_to_num(np.asarray(top, dtype=np.float64), nan=-np.inf)
    other = np.nan_to_num(np.asarray(other, dtype=np.float64), nan=-np.inf)
    thresholds, precision, recall = precision_recall(top, correct, other, prevalence)
    rows = []
    for target in PRECISIONS:
        t = threshold_for(thresholds, precision, target)
        r = float(recall[thresholds >= t].max()) if t is not None else 0.0
        rows.append({"precision": target, "threshold": t, "recall": r})
    named = {f"p{round(r['precision'] * 100)}": r["threshold"] for r in rows if r["precision"] in (0.9, 0.99)}
    return rows, named


def _table_line(name: str, row: dict[str, Any], width: int) -> str:
    t = "   -" if row["threshold"] is None else f"{row['threshold']:10.4f}"
    return f"  {name:<{width}} {row['precision']:>9.2f} {t:>10} {row['recall']:>7.3f}"


def format_table(report: dict[str, Any]) -> str:
    """The precision/recall table a user reads before trusting a threshold."""
    lines = [
        f"calibration on {report['images']} copies of training images (prevalence of copies "
        f"{report['prevalence']:.0%}; recall@1 {report['recall@1']:.3f}):",
        f"  {'score':<11} {'precision':>9} {'threshold':>10} {'recall':>7}",
    ]
    if report.get("whitening_images_reused"):
        lines.insert(
            1, "  (small index: some copied images also trained the whitening; thresholds are optimistic)"
        )
    for name in SCORES:
        lines.extend(_table_line(name, row, 11) for row in report["table"][name])
    partial = report.get("partial")
    if partial:
        answer = partial["answer"]
        lines.append(
            f"partial copies: {partial['copies']} training images and {partial['negatives']} outside images "
            f"pasted into {partial['scenes']} outside scenes; answer = {answer['rank']} 0, recall@1 "
            f"{partial['recall@1']:.3f}:"
        )
        lines.extend(_table_line(answer["score"], row, 16) for row in partial["table"])
        settings = " ".join(f"{k}={v}" for k, v in partial["settings"].items())
        lines.append(f"  (these hold for scans with {settings})")
    return "\n".join(lines)


# Thresholds from the papers, by name (METHODS.md): on the raw descriptor cosine, meaningful for SSCD.
NAMED_THRESHOLDS = {"somepalli": ("score_raw", 0.5), "duplicate": ("score_raw", 0.95)}


def resolve_threshold(manifest: dict[str, Any], name: str | float) -> dict[str, Any] | None:
    """What ``is_copy`` means for threshold ``name``: {"name", "column", "value", "source"}, or None.

    "p90" / "p99": the index's calibrated ``score_norm`` thresholds (None if it was not calibrated, or was
    rebuilt since); "somepalli" (score_raw ≥ 0.5) / "duplicate" (score_raw ≥ 0.95): from the papers; a
    number: ``score_norm`` ≥ that number; "none": no flag.
    """
    name = str(name)
    if name == "none":
        return None
    if name in ("p90", "p99"):
        cal = manifest.get("calibration")
        if not cal or cal.get("build_id") != manifest.get("build_id"):
            return None
        value = cal["thresholds"]["score_norm"].get(name)
        if value is None:
            return None
        source = f"copyscan calibrate: {name[1:]}% precision at {cal['prevalence']:.0%} copies"
        return {"name": name, "column": "score_norm", "value": float(value), "source": source}
    if name in NAMED_THRESHOLDS:
        column, value = NAMED_THRESHOLDS[name]
        return {"name": name, "column": column, "value": value, "source": "METHODS.md (published)"}
    try:
        value = float(name)
    except ValueError:
        raise CopyscanError(
            f"threshold {name!r}: use p90, p99, somepalli, duplicate, none or a score_norm value"
        ) from None
    return {"name": name, "column": "score_norm", "value": value, "source": "given"}
