"""Calibration: the score thresholds that give a chosen precision, estimated from the index's own images.

A sample of training images (never the ones whose augmented copies the learned whitening saw) is read back
from the index's source shards; each gets a ``copy_augment``-ed copy, embedded with the index's embedder and
searched against the whole index. Each copy gives two matches:

- its top-1 match, a true copy match when that is its source (the situation of a generation that copies a
  training image);
- its best match other than its source, scored as if the source were absent from the index and from the
  background sample (the situation of a generation that copies nothing in the training set); where the
  source also helped fit the index's whitening, as an unseen image did not, with the whitening fit again
  without it (``copyscan.search.calibrate.heldout``: ``held_out_share``).

With ``prevalence`` π (the share of queries that are copies), the precision of "top-1 score ≥ t" is

    precision(t) = π·P(top-1 is the source, s ≥ t) / (π·P(top-1 score ≥ t) + (1 − π)·P(best non-source ≥ t))

and its recall P(top-1 is the source, s ≥ t). For each score (``score``, ``score_norm``) the lowest
thresholds reaching 90 % and 99 % precision, with ``confidence`` (a bootstrap lower bound of precision over
the copies, ``copyscan.search.calibrate.thresholds.precision_table``), are kept in ``calibration.json`` next to the manifest and in
the manifest's ``calibration`` entry; ``copyscan scan`` flags ``is_copy`` with them.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from copyscan.indexing.embed.augment import copy_augment, key_seed
from copyscan.indexing.embed.decode import stack_pixels
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import index_embedder, load_manifest
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.ann.topk import ShardResult
from copyscan.search.calibrate.config import CalibrateConfig
from copyscan.search.calibrate.heldout import held_out_hits
from copyscan.search.calibrate.partial import calibrate_partial
from copyscan.search.calibrate.sample import read_back, select_rows
from copyscan.search.calibrate.thresholds import precision_table
from copyscan.search.calibrate.verified import QueryMaps, verified_scores, verify_settings
from copyscan.search.verify.whole import WholeSpec

logger = logging.getLogger("copyscan")

SCORES = ("score", "score_norm")
VERIFIED = "verify_score"  # with verify_whole=N (search/calibrate/verified.py)


def _copies(
    index_url: str,
    manifest: dict[str, Any],
    rows: dict[int, np.ndarray],
    embedder,
    cfg: CalibrateConfig,
    keep: Callable[[Image.Image], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Embedded copies (n, d) and their sources' packed ids (n,), reading the images from the source shards;
    ``keep`` sees each copy embedded, in their order (whole-copy verification maps them)."""
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
        if keep is not None:
            keep(copy)
        if len(pixels) >= cfg.batch_size:
            vectors.append(embedder.embed(stack_pixels(pixels)))
            pixels = []
    if pixels:
        vectors.append(embedder.embed(stack_pixels(pixels)))
    if not vectors:
        raise CopyscanError("no training image could be read back from the index's source shards")
    return np.concatenate(vectors), np.asarray(sources, dtype=np.int64), skipped


def run_calibrate(cfg: CalibrateConfig) -> dict[str, Any]:
    """Copy training images, search the copies, and store the thresholds in ``calibration.json`` and the
    manifest (module docstring); returns the calibration report."""
    so = cfg.storage_options
    t0 = time.time()
    manifest = load_manifest(cfg.index, so)
    embedder = _load_embedder(cfg, manifest)

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
    maps = (
        QueryMaps(WholeSpec(ranks=cfg.verify_whole, weight=cfg.verify_whole_weight))
        if cfg.verify_whole
        else None
    )
    xq, sources, skipped = _copies(cfg.index, manifest, rows, embedder, cfg, maps)
    # one search for the global scores (top 2) and the verification (its N best and one more)
    result, normaliser = _search_copies(cfg, manifest, xq, max(2, cfg.verify_whole + 1))
    correct, scores = _copy_scores(xq, sources, result, normaliser)
    held_out = None
    if cfg.held_out_share:  # with verification: the N best other matches, for its background of peaks
        held_out = held_out_hits(
            cfg.index, manifest, xq, sources, cfg.held_out_share, cfg.seed, max(1, cfg.verify_whole),
            cfg.storage_options,
        )  # fmt: skip
    if held_out is not None:
        for name, rest in zip(SCORES, held_out[:2], strict=True):
            scores[name] = (scores[name][0], rest[:, 0])
    verified = None
    if maps is not None:
        logger.info("calibrate: verifying each copy's %d best matches (verify_whole)", cfg.verify_whole)
        verified_correct, verified_top, verified_other, verified = verified_scores(
            cfg, manifest, maps, xq, sources, held_out, result, normaliser
        )
        verified["settings"] = verify_settings(maps.spec)
    report: dict[str, Any] = {
        "build_id": manifest["build_id"],
        "images": int(len(xq)),
        "skipped": skipped,
        "prevalence": cfg.prevalence,
        "seed": cfg.seed,
        "recall@1": float(correct.mean()),
        "whitening_images_reused": overlap,
        "negatives": "held out of the whitening's fit" if held_out is not None else "in-sample",
        "confidence": cfg.confidence,
        "thresholds": {},
        "table": {},
        "seconds": 0.0,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name, (top, rest) in scores.items():
        report["table"][name], report["thresholds"][name] = precision_table(
            top, correct, rest, cfg.prevalence, cfg.confidence, cfg.seed
        )
    if verified is not None:  # the answer is verify_rank 0, right or wrong apart from the global top-1
        report["verify_whole"] = verified
        report["table"][VERIFIED], report["thresholds"][VERIFIED] = precision_table(
            verified_top, verified_correct, verified_other, cfg.prevalence, cfg.confidence, cfg.seed
        )
    if cfg.partial:
        partial_rows, _ = select_rows(manifest, cfg.partial, cfg.max_shards, cfg.seed + 1, keys_of)
        report["partial"] = calibrate_partial(cfg, manifest, partial_rows)
    report["seconds"] = round(time.time() - t0, 1)
    _write(cfg, manifest, report)
    return report


def _load_embedder(cfg: CalibrateConfig, manifest: dict[str, Any]):
    """The index's embedder (its weights unless ``cfg.weights``), checked against the manifest."""
    if manifest["embedder"]["name"] == "laion-clip":
        raise CopyscanError(
            f"{cfg.index} was imported from precomputed embeddings: it has no images to copy for calibration; "
            "scan with threshold=<score_norm value> (or calibrate an index of the same images built from shards)"
        )
    return index_embedder(manifest, cfg.weights, cfg.device)


def _search_copies(
    cfg: CalibrateConfig, manifest: dict[str, Any], xq: np.ndarray, k: int
) -> tuple[ShardResult, ScoreNormaliser]:
    """The top ``k`` of the copies ``xq`` (n, d) float32 in the whole index, and its score normalisation
    (β = 1)."""
    so = cfg.storage_options
    searcher = ShardSearcher(
        cfg.index, manifest, [e["index_shard"] for e in manifest["index_shards"]], cfg.cache_dir, so
    )
    nprobe = cfg.nprobe or int(manifest["index"].get("nprobe") or 0)
    result = searcher.search(xq, k, max(cfg.candidates, k), nprobe)
    return result, ScoreNormaliser(cfg.index, manifest, 1.0, so)


def _copy_scores(
    xq: np.ndarray, sources: np.ndarray, result: ShardResult, normaliser: ScoreNormaliser
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The copies ``xq`` (n, d) float32 of the training images ``sources`` (n,) int64 packed ids, searched
    (``result``, at least their top 2): (correct (n,) bool: the top-1 is the source, {score column: (top-1
    scores (n,), scores of the best match that is not the source (n,))}), the latter normalised as if the
    source were in neither the index nor the background sample."""
    D, I = result.D[:, :2], result.I[:, :2]  # each pair's score_norm depends on that pair only
    norm_top = normaliser(xq, D, I)
    correct = I[:, 0] == sources
    other = np.where(correct, 1, 0)
    rows_idx = np.arange(len(xq))
    I_other = I[rows_idx, other][:, None]
    D_other = D[rows_idx, other][:, None]
    norm_other = normaliser(xq, D_other, I_other, exclude=sources)[:, 0]
    return correct, {
        "score": (D[:, 0], D_other[:, 0]),
        "score_norm": (norm_top[:, 0], norm_other),
    }


def _write(cfg: CalibrateConfig, manifest: dict[str, Any], report: dict[str, Any]) -> None:
    """``calibration.json``, then the manifest's ``calibration`` entry (what a scan reads)."""
    so = cfg.storage_options
    storage.write_json(layout.calibration_url(cfg.index), report, so)
    manifest["calibration"] = {
        k: report[k]
        for k in (
            "build_id",
            "images",
            "prevalence",
            "recall@1",
            "whitening_images_reused",
            "negatives",
            "confidence",
            "thresholds",
        )
    }
    if "verify_whole" in report:  # verify_score's thresholds hold for scans verifying with these settings
        manifest["calibration"]["verify_whole"] = {
            k: report["verify_whole"][k] for k in ("settings", "recall@1")
        }
    if cfg.partial:  # what a scan needs to flag partial answers, and under which settings they hold
        keys = ("copies", "negatives", "answer", "settings", "recall@1", "confidence", "thresholds")
        manifest["calibration"]["partial"] = {k: report["partial"][k] for k in keys}
    manifest["calibration"]["path"] = layout.CALIBRATION_NAME
    storage.write_json(storage.join(cfg.index, layout.MANIFEST_NAME), manifest, so)


def _table_line(name: str, row: dict[str, Any], width: int) -> str:
    t = "   -" if row["threshold"] is None else f"{row['threshold']:10.4f}"
    line = f"  {name:<{width}} {row['precision']:>9.2f} {t:>10} {row['recall']:>7.3f}"
    if "estimate_threshold" in row:  # the point estimate's threshold, for the margin the bound costs
        e = row["estimate_threshold"]
        line += f" {'-' if e is None else f'{e:.4f}':>10}"
    return line


def format_table(report: dict[str, Any]) -> str:
    """The precision/recall table a user reads before trusting a threshold."""
    lines = [
        f"calibration on {report['images']} copies of training images (prevalence of copies "
        f"{report['prevalence']:.0%}; recall@1 {report['recall@1']:.3f}; negatives "
        f"{report.get('negatives', 'in-sample')}):",
        f"  {'score':<11} {'precision':>9} {'threshold':>10} {'recall':>7}"
        + (f" {'estimate':>10}" if report.get("confidence") else ""),
    ]
    if report.get("confidence"):
        lines.insert(
            1,
            f"  (thresholds reach each precision with {report['confidence']:.0%} confidence; 'estimate': "
            "the lowest whose estimated precision does)",
        )
    if report.get("whitening_images_reused"):
        lines.insert(
            1, "  (small index: some copied images also trained the whitening; thresholds are optimistic)"
        )
    for name in (*SCORES, VERIFIED):
        lines.extend(_table_line(name, row, 11) for row in report["table"].get(name, ()))
    if "verify_whole" in report:
        verified = report["verify_whole"]
        n, weight = verified["settings"]["verify_whole"], verified["settings"]["verify_whole_weight"]
        lines.append(
            f"  (verify_score: the answer of verify_rank 0 among the {n} best matches, recall@1 "
            f"{verified['recall@1']:.3f}; holds for scans with verify_whole={n} verify_whole_weight={weight:g})"
        )
    partial = report.get("partial")
    if partial:
        answer, confidence = partial["answer"], partial.get("confidence")
        bounded = f"; thresholds with {confidence:.0%} confidence" if confidence else ""
        lines.append(
            f"partial copies: {partial['copies']} training images and {partial['negatives']} outside images "
            f"pasted into {partial['scenes']} outside scenes; answer = {answer['rank']} 0, recall@1 "
            f"{partial['recall@1']:.3f}{bounded}:"
        )
        lines.extend(_table_line(answer["score"], row, 16) for row in partial["table"])
        if partial.get("outside_note"):
            lines.append(f"  ({partial['outside_note']})")
        if confidence and partial["thresholds"].get("p90") is None:
            lines.append(
                f"  (no threshold reaches 90 % precision with {confidence:.0%} confidence on "
                f"{partial['copies']} + {partial['negatives']} pasted images: calibrate with more, partial=N "
                "and more outside images; confidence=0 takes the point estimate)"
            )
        settings = " ".join(f"{k}={v}" for k, v in partial["settings"].items())
        lines.append(f"  (these hold for scans with {settings})")
    return "\n".join(lines)
