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

``--domain`` and ``--seed`` as in bench.copy_detection (``--domain all --seed 0 1``: a table per domain with
each seed's figures and the mean, on stderr, and every run's JSON with the summary on stdout); the index of
each domain is bench.copy_detection's with the same --train, --negatives (here --index-negatives) and
--pair-images.

``--compare-query-modes`` scans the same queries twice in one run, with ``region_query_mode=crop`` (one
forward pass per window) and ``region_query_mode=pool`` (every window pooled from one pass), one after the
other on the same machine: a run per mode (``query_mode``, tabled apart), each with the ratio of its
generations per second to the first mode's (``speedup_generations_per_s``). ``--compare-query-modes
crop,hybrid,pool`` scans with those modes, in that order.

``--reflag`` makes no queries and scans nothing: each seed's scan made before is flagged again with the
partial-copy calibration the index has now (or that of ``--reflag INDEX``, a copy of the same build calibrated
otherwise), by the scan's own rule (``resolve_partial_threshold``, then ``flag_partial``), and scored as
above: what ``is_partial_copy`` would have been had the scan run after that calibration. The rest of the
scan's columns are its own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from bench import domains as bench_domains
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


# the figures summarised per domain: global, region matching's own ranking and dense verification when run
FIGURES = (
    ("recall@1", ("recall@1",)),
    ("AP score_norm", ("score_norm", "ap")),
    ("local recall@1", ("local_score_norm", "recall@1")),
    ("AP local_score_norm", ("local_score_norm", "ap")),
    ("dense recall@1", ("dense_score", "recall@1")),
    ("AP dense_score", ("dense_score", "ap")),
)


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
    bench_domains.add_arguments(parser)
    parser.add_argument("--work", default=None, help="bench.copy_detection's --work, if it was given one")
    parser.add_argument(
        "--index-tag", default=None, help="its index-<tag> folder (default: from --pair-images)"
    )
    parser.add_argument(
        "--compare-query-modes",
        nargs="?",
        const="crop,pool",
        default=None,
        metavar="MODES",
        help="scan the same queries with each region_query_mode of MODES (default crop,pool), one after the "
        "other; print each",
    )
    parser.add_argument(
        "--reflag",
        nargs="?",
        const="",
        default=None,
        metavar="INDEX",
        help="scan nothing: flag each seed's earlier scan again with the partial-copy calibration of INDEX "
        "(default: the scanned index's, as it is now) and score it",
    )
    parser.add_argument("overrides", nargs="*", help="scan config overrides")
    args = parser.parse_args(argv)
    setup_logging()
    if args.reflag is None:  # --reflag scans nothing
        init_ray()
    runs = []
    for domain in bench_domains.domains(args.domain):
        for seed in args.seed:
            results = run_one(args, domain, seed)
            if results is None:
                return 2
            runs += results
            for result in results:
                print(json.dumps(result), file=sys.stderr, flush=True)
    if len(runs) == 1:
        print(json.dumps(runs[0], indent=2))
        return 0
    summary = bench_domains.summarise(
        runs,
        FIGURES,
        group=lambda run: f"{run['embedder']} {run.get('region_query_mode') or run['regions']['query_mode']}",
    )
    print(bench_domains.table(summary, FIGURES), file=sys.stderr)
    sizes = {
        "train": args.train,
        "copies": args.copies,
        "negatives": args.negatives,
        "scenes": args.scenes,
        "index_negatives": args.index_negatives,
    }
    print(json.dumps({"bench": "partial_copies", "sizes": sizes, "summary": summary, "runs": runs}, indent=2))
    return 0


def run_one(args: argparse.Namespace, domain: str, seed: int) -> list[dict] | None:
    """The pasted copies of ``seed`` on ``domain``, scanned against bench.copy_detection's index of it: one
    run, or with ``--compare-query-modes`` one per query mode (cropped first); None without the index."""
    t0 = time.time()
    work = bench_domains.work_dir(args.work, domain, args.train, args.index_negatives)
    index_out = work / f"index-{args.index_tag or f'whitening_pair_images={args.pair_images}'}"
    if not (index_out / "manifest.json").exists():
        print(
            f"no index at {index_out}: run python -m bench.copy_detection --domain {domain} first",
            file=sys.stderr,
        )
        return None
    manifest = load_manifest(str(index_out))
    keys = demo_data.source_keys(str(work / "shards"))
    staged = sorted((work / "www").iterdir())
    key_of_source = {str(p): keys[p.name] for p in staged if p.name in keys}
    seen = paired_keys(str(index_out), manifest, args.pair_images)
    sources = [p for p in staged if str(p) in key_of_source and key_of_source[str(p)] not in seen]
    # images never indexed: the first go to bench.copy_detection's negatives; scenes and objects follow
    files = real_image_files(args.train + args.index_negatives + args.scenes + args.negatives, domain=domain)
    outside = files[args.train + args.index_negatives :]
    scenes = scene_pool(outside[: args.scenes])
    objects = outside[args.scenes :]

    def augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        img.thumbnail((SCENE_SIDE, SCENE_SIDE), Image.Resampling.LANCZOS)
        out, _box = paste_partial(img, scenes[int(rng.integers(len(scenes)))], rng)
        return out

    tag = "-".join(sorted(args.overrides)).replace("/", "_") or "default"
    queries = work / f"partial-queries-seed{seed}-{args.copies}-{args.negatives}"
    scan_out = work / f"partial-scan-{index_out.name[len('index-') :]}-{tag}-seed{seed}"
    if args.reflag is not None:
        calibrated = args.reflag or str(index_out)
        return [reflag(calibrated, domain, seed, queries, scan_out, key_of_source, manifest)]
    t_queries = time.time()
    if queries.exists():
        shutil.rmtree(queries)
    truth = demo_data.make_generated_images(
        sources, objects, str(queries), n_copies=args.copies, n_unrelated=args.negatives, seed=seed,
        augment=augment,
    )  # fmt: skip
    t_made = time.time()
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
            "bench": "partial_copies",
            "domain": domain,
            "train_images": manifest["ntotal"],
            "embedder": manifest["embedder"]["name"],
            "index": manifest["index"]["factory"],
            "scan_overrides": overrides,
            "seed": seed,
            "generations": len(truth),
            "paste": {
                "longer_side_of_scene_short_side": [0.35, 0.5],
                "jpeg_quality": [60, 90],
                "scenes": len(scenes),
            },
            **evaluate(out, truth, key_of_source),
            # the region settings the scan ran with, defaults included (summary.json's "regions")
            "regions": {
                key: summary["regions"].get(key)
                for key in ("windows", "query_mode", "query_size", "recrop", "refine", "slide")
            }
            if summary.get("regions")
            else None,
            "seconds": {
                "total": round(time.time() - t0, 1),
                "make_queries": round(t_made - t_queries, 1),
                "scan_job": round(seconds, 1),
                "generations_per_s": round(len(truth) / seconds, 4),
                "scan_queries_per_s": summary["this_run"]["queries_per_second"],
            },
        }

    if not args.compare_query_modes:
        return [scan(args.overrides, scan_out)]
    modes = [
        scan([*args.overrides, f"region_query_mode={mode}"], pathlib.Path(f"{scan_out}-{mode}"))
        for mode in (m.strip() for m in args.compare_query_modes.split(",") if m.strip())
    ]
    for run in modes:
        run["region_query_mode"] = run["scan_overrides"][-1].partition("=")[2]
        speedup = run["seconds"]["generations_per_s"] / modes[0]["seconds"]["generations_per_s"]
        run["speedup_generations_per_s"] = round(speedup, 2)
    return modes


def reflag(
    calibrated: str,
    domain: str,
    seed: int,
    queries: pathlib.Path,
    scan_out: pathlib.Path,
    key_of_source: dict[str, str],
    manifest: dict,
) -> dict:
    """``--reflag``: the scan at ``scan_out`` of ``queries`` (its ground truth) scored with ``is_partial_copy``
    set again from the partial-copy calibration of index ``calibrated`` (same build as ``manifest``'s)."""
    import pyarrow as pa
    import yaml

    from copyscan.search.calibrate.thresholds import resolve_partial_threshold
    from copyscan.search.results.write import flag_partial
    from copyscan.search.scan_config import ScanConfig

    for path in (queries / "ground_truth.json", scan_out / "run.yaml", scan_out / "summary.json"):
        if not path.exists():
            raise SystemExit(f"--reflag: no {path} (run this bench without --reflag first)")
    truth = json.loads((queries / "ground_truth.json").read_text())
    cfg = resolve(ScanConfig, yaml.safe_load((scan_out / "run.yaml").read_text()))
    calibration = load_manifest(calibrated).get("calibration")
    threshold, why = resolve_partial_threshold({**manifest, "calibration": calibration}, cfg, regions=True)
    flagged = scan_out.parent / f"{scan_out.name}-reflagged"
    shutil.rmtree(flagged, ignore_errors=True)
    (flagged / "matches").mkdir(parents=True)
    table = pq.read_table(scan_out / "matches")
    if threshold is None:  # as the scan leaves it: empty
        table = table.set_column(
            table.schema.get_field_index("is_partial_copy"),
            "is_partial_copy",
            pa.nulls(table.num_rows, pa.bool_()),
        )
    else:
        table = flag_partial(table, threshold)
    pq.write_table(table, flagged / "matches" / "part-0.parquet")
    summary = json.loads((scan_out / "summary.json").read_text())
    shutil.copy(scan_out / "summary.json", flagged / "summary.json")  # is_copy's threshold, as scanned
    partial = (calibration or {}).get("partial") or {}
    return {
        "bench": "partial_copies",
        "reflag": True,
        "domain": domain,
        "embedder": manifest["embedder"]["name"],
        "seed": seed,
        "regions": {
            key: (summary.get("regions") or {}).get(key) for key in ("query_mode", "refine", "slide")
        },
        "scan": str(scan_out),
        "calibration": {
            "index": calibrated,
            **{k: partial.get(k) for k in ("copies", "negatives", "recall@1", "confidence", "thresholds")},
        },
        "partial_threshold": threshold,
        "partial_threshold_why": why,
        "generations": len(truth),
        **evaluate(flagged, truth, key_of_source),
    }


if __name__ == "__main__":
    sys.exit(main())
