"""Partial copies: how often the scan finds a training image pasted as an object into a new scene. Prints JSON.

The evaluation set of the partial-copy issue: a real training image, scaled so its longer side is 35–50 % of
a different real image's shorter side, pasted at a random position into it, then JPEG
(``copyscan.indexing.embed.augment.paste_partial``). Negatives are images from outside the training set pasted
the same way into the same pool of scenes, so neither the scenes nor the pasting tell copies apart. The scenes
are images from outside the training set, downsized to at most 768 px (generations are 512–1024 px).

It runs on the index of ``bench.copy_detection`` (same ``--work`` and ``--train``; run that first) with
``copyscan scan`` and scores ``matches/`` exactly as that bench does: recall@1 of the source, and AP per
score column with copies as positives (a copy counts only when its rank-0 match is its source).

    python -m bench.copy_detection --train 1000 --negatives 500     # builds the index once
    python -m bench.partial_copies --train 1000 --copies 300 --negatives 300 [scan overrides...]

``--compare-query-modes`` scans the same queries twice in one run, with ``region_query_mode=crop`` (one
forward pass per window) and ``region_query_mode=pool`` (every window pooled from one pass), one after the
other on the same machine, and prints both (``modes``) with the ratio of their generations per second.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np
from PIL import Image

from bench.copy_detection import evaluate, paired_keys
from copyscan.indexing.embed.augment import paste_partial
from copyscan.indexing.read.images import composite_rgb
from copyscan.indexing.runtime.config import parse_overrides, resolve
from copyscan.indexing.store.manifest import load_manifest
from copyscan.jobs._runtime import init_ray, setup_logging
from copyscan.jobs.demo import data as demo_data
from copyscan.jobs.demo.sample_images import real_image_files

SCENE_SIDE = 768


def scene_pool(paths: list[pathlib.Path]) -> list[Image.Image]:
    scenes = []
    for path in paths:
        with Image.open(path) as img:
            img.draft("RGB", (SCENE_SIDE, SCENE_SIDE))  # JPEG: decode at a reduced scale
            img = composite_rgb(img)
            img.thumbnail((SCENE_SIDE, SCENE_SIDE), Image.Resampling.LANCZOS)
            scenes.append(img)
    return scenes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--negatives", type=int, default=300)
    parser.add_argument("--scenes", type=int, default=200, help="images from outside the training set")
    parser.add_argument(
        "--index-negatives", type=int, default=500, help="--negatives of bench.copy_detection"
    )
    parser.add_argument("--pair-images", type=int, default=400, help="as given to bench.copy_detection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="bench.copy_detection's work folder")
    parser.add_argument("--index-tag", default="whitening_pair_images=400", help="its index-<tag> folder")
    parser.add_argument(
        "--compare-query-modes",
        action="store_true",
        help="scan the same queries with region_query_mode=crop and =pool, one after the other; print both",
    )
    parser.add_argument("overrides", nargs="*", help="scan config overrides")
    args = parser.parse_args(argv)
    setup_logging()
    t0 = time.time()
    cache = pathlib.Path(os.environ.get("COPYSCAN_CACHE", pathlib.Path.home() / ".cache" / "copyscan"))
    default_work = cache / "bench" / f"copy_detection-{args.train}-{args.index_negatives}"
    work = pathlib.Path(args.work or default_work)
    index_out = work / f"index-{args.index_tag}"
    if not (index_out / "manifest.json").exists():
        print(f"no index at {index_out}: run python -m bench.copy_detection first", file=sys.stderr)
        return 2
    manifest = load_manifest(str(index_out))
    keys = demo_data.source_keys(str(work / "shards"))
    staged = sorted((work / "www").iterdir())
    key_of_source = {str(p): keys[p.name] for p in staged if p.name in keys}
    seen = paired_keys(str(index_out), manifest, args.pair_images)
    sources = [p for p in staged if str(p) in key_of_source and key_of_source[str(p)] not in seen]
    # images never indexed: the first go to bench.copy_detection's negatives; scenes and objects follow
    files = real_image_files(args.train + args.index_negatives + args.scenes + args.negatives)
    outside = files[args.train + args.index_negatives :]
    scenes = scene_pool(outside[: args.scenes])
    objects = outside[args.scenes :]

    def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img.thumbnail((SCENE_SIDE, SCENE_SIDE), Image.Resampling.LANCZOS)
        out, _box = paste_partial(img, scenes[int(rng.integers(len(scenes)))], rng)
        return out

    tag = "-".join(sorted(args.overrides)) or "default"
    queries = work / f"partial-queries-seed{args.seed}-{args.copies}-{args.negatives}"
    scan_out = work / f"partial-scan-{args.index_tag}-{tag}-seed{args.seed}"
    t_queries = time.time()
    if queries.exists():
        shutil.rmtree(queries)
    truth = demo_data.make_generated_images(
        sources, objects, str(queries), n_copies=args.copies, n_unrelated=args.negatives, seed=args.seed,
        augment=augment,
    )  # fmt: skip
    init_ray()
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    def scan(overrides: list[str], out: pathlib.Path) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        t_scan = time.time()
        summary = run_scan(
            resolve(
                ScanConfig,
                {"index": str(index_out), "queries": str(queries), "out": str(out)},
                parse_overrides(overrides),
            )
        )
        seconds = time.time() - t_scan
        return {
            **evaluate(out, truth, key_of_source),
            # the region settings the scan ran with, defaults included (summary.json's "regions")
            "regions": {
                key: summary["regions"].get(key)
                for key in ("windows", "query_mode", "query_size", "refine", "slide")
            }
            if summary.get("regions")
            else None,
            "seconds": {
                "scan_job": round(seconds, 1),
                "generations_per_s": round(len(truth) / seconds, 4),
                "scan_queries_per_s": summary["this_run"]["queries_per_second"],
            },
        }

    t_scan = time.time()
    if args.compare_query_modes:
        modes = {
            mode: scan([*args.overrides, f"region_query_mode={mode}"], pathlib.Path(f"{scan_out}-{mode}"))
            for mode in ("crop", "pool")
        }
        rate = {mode: modes[mode]["seconds"]["generations_per_s"] for mode in modes}
        scanned = {"modes": modes, "speedup_generations_per_s": round(rate["pool"] / rate["crop"], 2)}
    else:
        scanned = scan(args.overrides, scan_out)
    result = {
        "bench": "partial_copies",
        "train_images": manifest["ntotal"],
        "embedder": manifest["embedder"]["name"],
        "index": manifest["index"]["factory"],
        "scan_overrides": args.overrides,
        "seed": args.seed,
        "generations": len(truth),
        "paste": {
            "longer_side_of_scene_short_side": [0.35, 0.5],
            "jpeg_quality": [60, 90],
            "scenes": len(scenes),
        },
        **scanned,
        "seconds": {
            "total": round(time.time() - t0, 1),
            "make_queries": round(t_scan - t_queries, 1),
            "scan_jobs": round(time.time() - t_scan, 1),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
