"""Calibration of the partial-copy answer: thresholds from training images pasted into outside scenes.

For an index with a region index (``copyscan index regions=true``), ``copyscan calibrate partial=N
outside=URL`` makes the partial-copy issue's evaluation set from the index itself: ``N`` of its training
images (never whitening-pair images), each scaled so its longer side is 35–50 % of a scene's shorter side
and pasted at a random place (``copyscan.indexing.embed.augment.paste_partial``, then JPEG), into scenes from
``outside`` (image files that are not in the training set); and as many images from ``outside`` pasted the
same way into the same scenes, which copy nothing. They are written under ``INDEX/calibration/partial-seedS/``
and scanned by the real scan (``copyscan.search.scan_ray.run_scan``) with the partial-copy settings
``partial_scan``.

Each generation's *answer* is its row of ``dense_rank`` 0 scored by ``dense_score`` (with dense
verification), else its row of ``local_rank`` 0 scored by ``local_score_norm``. A pasted copy's answer is a
true match when it is the pasted image; an outside paste's answer stands for a generation that copies
nothing. The thresholds for 90 % and 99 % precision at ``prevalence`` are the lowest whose precision reaches
the target with ``confidence`` (``precision_table``, unpaired: copies and outside pastes are samples of their
own, a few dozen each, so the bound is the rates' posterior, which a threshold passed by a handful of copies
and no negative cannot reach; 0 = the point estimate), and go into ``calibration.json`` and the manifest
with the scan settings they hold for (``PARTIAL_KEYS``): ``copyscan scan`` flags ``is_partial_copy`` on
answers only when it runs with the same. A calibration too small for the promise gives no threshold, and
the scan says so.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from copyscan.indexing.embed.augment import key_seed, paste_partial
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.images import composite_rgb
from copyscan.indexing.read.shardlist import expand_queries
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import layout, storage
from copyscan.search.calibrate.sample import read_back
from copyscan.search.calibrate.thresholds import (
    answer_columns,
    partial_answers,
    partial_settings,
    precision_table,
)

logger = logging.getLogger("copyscan")

SCENE_SIDE = 768  # scenes downsized to at most this (generations are 512–1024 px)


def _scene(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (SCENE_SIDE, SCENE_SIDE))  # JPEG: decode at a reduced scale
        scene = composite_rgb(img)
        scene.thumbnail((SCENE_SIDE, SCENE_SIDE), Image.Resampling.LANCZOS)
        return scene


def scene_count(n_outside: int) -> int:
    """How many of an ``outside`` folder's images become scenes: a third, at least one; the rest are objects."""
    return max(1, n_outside // 3)


def outside_shortfall(n_outside: int, partial: int) -> str | None:
    """Why an ``outside`` folder of ``n_outside`` images gives fewer outside pastes than ``partial`` (and the
    folder size that would not), or None when it gives enough."""
    objects = n_outside - scene_count(n_outside)
    if objects >= partial:
        return None
    need = partial + 1
    while need - scene_count(need) < partial:
        need += 1
    return (
        f"outside gives {objects} outside pastes ({n_outside} images, {n_outside - objects} of them scenes), "
        f"fewer than partial={partial}, so the bound on false flags is wider and the thresholds higher; "
        f"{need} images would give {partial}"
    )


def make_partial_queries(
    cfg: Any, manifest: dict[str, Any], rows: dict[int, np.ndarray], folder: str
) -> tuple[dict[str, str | None], list[dict[str, Any]], dict[str, Any]]:
    """Write the pasted generations into ``folder``: ``partial_NNNNN.jpg`` for the training images at
    ``rows`` ({embedding shard: rows}) and for images of ``cfg.outside``, each into a scene of
    ``cfg.outside`` (a third of its images, seeded; the others are the objects that copy nothing).

    Returns ({file: source key, or None for an outside object}, skipped images with the reason, counts:
    copies, negatives, scenes and, where the folder gives fewer outside pastes than ``partial``, why)."""

    so = cfg.storage_options
    kind, outside = expand_queries(cfg.outside, so)
    if kind != "images" or len(outside) < 2:
        raise CopyscanError(
            f"outside={cfg.outside} must be a folder of at least 2 image files that are not in the training set"
        )
    order = np.random.default_rng(cfg.seed).permutation(len(outside))
    n_scenes = scene_count(len(outside))
    shortfall = outside_shortfall(len(outside), cfg.partial)
    if shortfall:
        logger.warning("calibrate: %s", shortfall)
    skipped: list[dict[str, Any]] = []
    scenes = []
    for i in order[:n_scenes]:
        try:
            scenes.append(_scene(storage.read_bytes(outside[i], so)))
        except Exception as exc:  # a file of the folder that is no image (the folder takes every file)
            skipped.append({"outside": outside[i], "detail": f"{type(exc).__name__}: {exc}"})
    if not scenes:
        raise CopyscanError(f"outside={cfg.outside}: none of its first {n_scenes} files is a readable image")
    objects = [outside[i] for i in order[n_scenes:]]
    truth: dict[str, str | None] = {}

    def paste(obj: Image.Image, rng: np.random.Generator) -> None:
        obj = composite_rgb(obj)
        obj.thumbnail((SCENE_SIDE, SCENE_SIDE), Image.Resampling.LANCZOS)
        img, _box = paste_partial(obj, scenes[int(rng.integers(len(scenes)))], rng)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=95)
        storage.write_bytes(storage.join(folder, f"partial_{len(truth):05d}.jpg"), buffer.getvalue(), so)

    for shard, _row, key, img, why in read_back(cfg.index, manifest, rows, so):
        if img is None:
            skipped.append({"shard": shard, "key": key, "detail": why})
            continue
        paste(img, np.random.default_rng([cfg.seed, shard, key_seed(key)]))
        truth[f"partial_{len(truth):05d}.jpg"] = key
    copies = len(truth)
    for i, url in enumerate(objects[: cfg.partial]):
        try:
            with Image.open(io.BytesIO(storage.read_bytes(url, so))) as img:
                img.load()
                obj = img.copy()
        except Exception as exc:  # an unreadable outside image: noted, skipped
            skipped.append({"outside": url, "detail": f"{type(exc).__name__}: {exc}"})
            continue
        paste(obj, np.random.default_rng([cfg.seed, 1, i]))
        truth[f"partial_{len(truth):05d}.jpg"] = None
    counts: dict[str, Any] = {"copies": copies, "negatives": len(truth) - copies, "scenes": len(scenes)}
    if shortfall:
        counts["outside_note"] = shortfall
    if not copies or not counts["negatives"]:
        raise CopyscanError(f"too few pasted generations to calibrate partial copies: {counts}")
    return truth, skipped, counts


def calibrate_partial(cfg: Any, manifest: dict[str, Any], rows: dict[int, np.ndarray]) -> dict[str, Any]:
    """Paste, scan and score (module docstring); the ``partial`` entry of the calibration report."""
    from copyscan.search.results.dataset import open_matches

    so = cfg.storage_options
    if not manifest.get("regions"):
        raise CopyscanError(
            f"partial={cfg.partial}: {cfg.index} has no region index (index it with regions=true)"
        )
    work = layout.partial_calibration_dir(cfg.index, cfg.seed)
    spec = {
        "partial": cfg.partial,
        "outside": cfg.outside,
        "rows": {str(s): r.tolist() for s, r in rows.items()},
    }
    spec_url = storage.join(work, "spec.json")
    if storage.exists(spec_url, so) and storage.read_json(spec_url, so) != spec:
        storage.remove(work, so, recursive=True)  # other images: the earlier set and its scan no longer apply
    queries = storage.join(work, "queries")
    truth, skipped, counts = make_partial_queries(cfg, manifest, rows, queries)
    storage.write_json(spec_url, spec, so)
    scan_cfg, summary = _scan_pasted(cfg, queries, storage.join(work, "scan"), counts)
    settings = partial_settings(scan_cfg, manifest)
    answers = partial_answers(open_matches(storage.join(work, "scan"), so).to_table(), settings)
    correct, table, named = _score_answers(truth, answers, cfg.prevalence, cfg.confidence, cfg.seed)
    rank, score = answer_columns(settings)
    return {
        **counts,
        "answer": {"rank": rank, "score": score},
        "settings": settings,
        "recall@1": float(correct.mean()),
        "confidence": cfg.confidence,
        "thresholds": named,
        "table": table,
        "skipped": skipped,
        "scan": storage.join(work, "scan"),
        "scan_seconds": summary["this_run"]["seconds"],
    }


def _scan_pasted(cfg: Any, queries: str, out: str, counts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Scan the pasted generations in ``queries`` into ``out`` on Ray with ``cfg.partial_scan`` (no flags):
    (the scan's resolved config, its summary)."""
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    scan_cfg = resolve(
        ScanConfig,
        cfg.partial_scan,
        {
            "index": cfg.index,
            "queries": queries,
            "out": out,
            "threshold": "none",
            "partial_threshold": "none",
            "regions": "on",
            "cache_dir": cfg.cache_dir,
            "storage_options": cfg.storage_options,
        },
    )
    logger.info(
        "calibrate: scanning %d pasted copies and %d pasted outside images (%s)",
        counts["copies"],
        counts["negatives"],
        ", ".join(f"{k}={v}" for k, v in sorted(cfg.partial_scan.items())),
    )
    return scan_cfg, run_scan(scan_cfg)


def _score_answers(
    truth: dict[str, str | None],
    answers: dict[str, tuple[str, float]],
    prevalence: float,
    confidence: float,
    seed: int,
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, float | None]]:
    """(correct (copies,) bool, precision table, named thresholds) of the generations' partial answers:
    a pasted copy's answer is right when it is its source; an outside paste's answer is a false match."""
    positives = [q for q, key in truth.items() if key is not None]
    negatives = [q for q, key in truth.items() if key is None]
    top = np.array([answers.get(q, (None, -np.inf))[1] for q in positives], dtype=np.float64)
    correct = np.array([answers.get(q, (None, 0))[0] == truth[q] for q in positives])
    other = np.array([answers.get(q, (None, -np.inf))[1] for q in negatives], dtype=np.float64)
    table, named = precision_table(top, correct, other, prevalence, confidence, seed, paired=False)
    return correct, table, named
