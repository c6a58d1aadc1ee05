"""``copyscan demo``: the whole path, offline, on real images.

1. Real artwork from small Debian packages (``copyscan.jobs.demo.sample_images.DEMO_PACKAGES``) is served on a
   loopback HTTP server, and **img2dataset** downloads it into LAION-format webdataset shards, as a real
   user's LAION download would (two planted dead links show img2dataset's own failure accounting).
2. "Generated" images are made: transformed copies of some training images (crop, rotation, colour,
   rescale, JPEG, overlaid text) mixed with images that are not in the training set.
3. ``copyscan index`` runs on a local Ray, ``copyscan calibrate`` sets the index's 90 %-precision threshold
   from copies of its own images, ``copyscan scan`` flags the generated images with it (``is_copy``) and
   ``copyscan report`` writes the HTML report; the planted copies found and flagged, the unrelated images
   flagged, and where the report is are printed.

Everything lands in ``--out`` (default ``demo-output/``); a second run resumes (nothing is redone).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from copyscan.jobs._runtime import Job, init_ray

logger = logging.getLogger("copyscan")


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-output", help="local folder for everything the demo writes")
    parser.add_argument("--train-images", type=int, default=200, help="training images to download and index")
    parser.add_argument("--copies", type=int, default=16, help="generated images that copy a training image")
    parser.add_argument("--unrelated", type=int, default=16, help="generated images that copy nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete an earlier demo output first")
    parser.add_argument("--ray-address", help="Ray cluster to attach to (default: a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray")
    parser.add_argument("-v", "--verbose", action="store_true")


def _body(args: argparse.Namespace) -> None:
    report = run_demo(
        Path(args.out),
        args.train_images,
        args.copies,
        args.unrelated,
        args.seed,
        args.fresh,
        args.ray_address,
        args.num_cpus,
    )
    print(report)


def run_demo(
    out: Path,
    n_train: int,
    n_copies: int,
    n_unrelated: int,
    seed: int,
    fresh: bool,
    ray_address: str | None = None,
    num_cpus: int | None = None,
) -> str:
    """Run the demo into ``out``; return the printed report."""
    from copyscan.jobs.demo import data as demo_data
    from copyscan.jobs.demo.sample_images import DEMO_PACKAGES, real_image_files

    t0 = time.time()
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    logger.info("demo: collecting %d real images from %s", n_train + n_unrelated, ", ".join(DEMO_PACKAGES))
    images = real_image_files(n_train + n_unrelated, packages=DEMO_PACKAGES)
    train, others = images[:n_train], images[n_train:]
    www = out / "www"
    staged = demo_data.stage_images(train, www)
    downloads = _download(out, www, staged)
    truth = demo_data.make_generated_images(
        staged, others, str(out / "generated"), n_copies=n_copies, n_unrelated=n_unrelated, seed=seed
    )
    init_ray(ray_address, num_cpus)
    manifest, calibration, summary = _index_calibrate_scan(out)
    report = _html_report(out)
    key_of_source = demo_data.source_keys(str(out / "shards"))
    return _report(
        out, truth, key_of_source, www, (manifest, calibration, summary, report), downloads, time.time() - t0
    )


def _download(out: Path, www: Path, staged: list[Path]) -> dict[str, dict[str, Any]]:
    """img2dataset downloads the ``staged`` images (and two dead links) from a loopback server of ``www``
    into ``out/shards``; returns its per-shard stats."""
    from copyscan.jobs.demo import data as demo_data

    dead = [www / "missing" / "dead-link-1.jpg", www / "missing" / "dead-link-2.jpg"]
    shards_dir = out / "shards"
    with demo_data.serve_directory(www) as base_url:
        url_list = demo_data.write_url_list(staged + dead, base_url, str(out / "url_list.parquet"), root=www)
        logger.info(
            "demo: img2dataset downloads %d URLs from %s into %s",
            len(staged) + len(dead),
            base_url,
            shards_dir,
        )
        demo_data.run_img2dataset(url_list, str(shards_dir), number_sample_per_shard=64, thread_count=8)
    return demo_data.read_shard_stats(str(shards_dir))


def _index_calibrate_scan(out: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``copyscan index`` of ``out/shards``, ``copyscan calibrate`` of the index (once: a resumed demo keeps
    its thresholds) and ``copyscan scan`` of ``out/generated``, default settings (Ray started): (the index
    manifest, the manifest's calibration entry, the scan summary)."""
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store.manifest import load_manifest
    from copyscan.search.calibrate.config import CalibrateConfig
    from copyscan.search.calibrate.whole import run_calibrate
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    index_url = str(out / "index")
    manifest = run_index(resolve(IndexConfig, {"shards": str(out / "shards"), "out": index_url}))
    if not manifest.get("calibration"):
        # as many copies as the index has images (at most the default 1,000)
        run_calibrate(
            resolve(CalibrateConfig, {"index": index_url, "images": min(1_000, manifest["ntotal"])})
        )
        manifest = load_manifest(index_url)
    scan_cfg = resolve(
        ScanConfig, {"index": index_url, "queries": str(out / "generated"), "out": str(out / "scan")}
    )
    return manifest, manifest["calibration"], run_scan(scan_cfg)


def _html_report(out: Path) -> dict[str, Any]:
    """``copyscan report`` of the scan into ``out/scan/report`` (report.html, stats.json); its stats."""
    from copyscan.indexing.runtime.config import resolve
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.report.run import run_report

    return run_report(resolve(ReportConfig, {"run": str(out / "scan")}))


def _report(out, truth, key_of_source, www, results, downloads, seconds) -> str:
    """The printed report: what was set up, each generated image's best match, what was flagged, where the
    outputs are; writes ``out/demo_result.json``. results: (manifest, calibration, scan summary, report
    stats)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest, calibration, summary, _ = results
    matches = pq.read_table(out / "scan" / "matches")
    top = matches.filter(pc.equal(matches["rank"], 0)).to_pylist()
    best = {row["query_id"]: row for row in top}
    lines, found = _match_lines(truth, best, key_of_source, www)
    flagged = _flagged(truth, best, key_of_source, www)
    copies = [t for t in truth if t["is_copy"]]
    result = {"planted": len(copies), "found_at_rank0": found, **flagged, "seconds": round(seconds, 1)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    header = _header(out, manifest, summary, downloads, calibration)
    return "\n".join(header + lines + _footer(out, truth, best, found, flagged, seconds))


def _flagged(truth, best, key_of_source, www) -> dict[str, int]:
    """What the scan flagged (``is_copy`` of each generated image's best match): planted copies flagged, of
    them those flagged on their source, and unrelated images flagged."""
    out = {"copies_flagged": 0, "copies_flagged_on_source": 0, "unrelated_flagged": 0, "unrelated": 0}
    for t in truth:
        row = best.get(t["file"])
        is_copy = bool(row and row["is_copy"])
        if not t["is_copy"]:
            out["unrelated"] += 1
            out["unrelated_flagged"] += is_copy
            continue
        out["copies_flagged"] += is_copy
        source = key_of_source.get(Path(t["source_image"]).relative_to(www).as_posix())
        out["copies_flagged_on_source"] += is_copy and row["train_key"] == source
    return out


def _match_lines(truth, best, key_of_source, www) -> tuple[list[str], int]:
    """One line per generated image (verdict, what was planted, its top-1 match), and the copies found."""
    lines = []
    found = 0
    for t in truth:
        row = best.get(t["file"])
        expected = (
            key_of_source.get(Path(t["source_image"]).relative_to(www).as_posix()) if t["is_copy"] else None
        )
        hit = row is not None and expected is not None and row["train_key"] == expected
        found += hit
        verdict = ("FOUND " if hit else "MISSED") if t["is_copy"] else "      "
        verdict += " flagged" if row is not None and row["is_copy"] else "        "
        match = (
            f"{row['train_key']}  {row['score']:.3f}  {row['score_norm']:+.3f}  {row['caption']}"
            if row
            else "(no match)"
        )
        planted = f"copy of {Path(t['source_image']).name}" if t["is_copy"] else "not in training set"
        lines.append(f"  {verdict} {t['file']:<14} {planted:<44} top-1: {match}")
    return lines, found


def _header(out, manifest, summary, downloads, calibration) -> list[str]:
    failed_downloads = sum(
        s.get("failed_to_download", 0) + s.get("failed_to_resize", 0) for s in downloads.values()
    )
    return [
        "",
        "copyscan demo",
        f"  img2dataset: {sum(s['successes'] for s in downloads.values())} images downloaded into "
        f"{len(downloads)} shards, {failed_downloads} failed (recorded in {out / 'shards'}/*_stats.json)",
        f"  index: {manifest['ntotal']} vectors, {manifest['index']['factory']}, embedder {manifest['embedder']['name']} "
        f"(dim {manifest['dim']}), {manifest['rejected_total']} images rejected",
        f"  calibrate: {_threshold(calibration)}",
        f"  scan: {summary['queries']} generated images, {summary['matches']} matches (top-{summary['k']}), "
        f"{summary.get('flagged')} flagged ({_rule(summary['threshold'])})",
        "",
        "generated image, verdict, what was planted, and its best match (train key, score, score_norm, caption):",
    ]


def _rule(threshold: dict[str, Any]) -> str:
    """The scan's ``is_copy`` rule (its summary's ``threshold``) as one phrase."""
    if "column" not in threshold:
        return f"threshold {threshold['name']}: not calibrated, nothing flagged"
    return f"is_copy: {threshold['column']} >= {threshold['value']:.3f}, {threshold['name']}"


def _threshold(calibration: dict[str, Any]) -> str:
    """The calibrated p90 threshold as one phrase."""
    p90 = calibration["thresholds"]["score_norm"].get("p90")
    if p90 is None:
        return (
            f"no score_norm threshold reaches 90 % precision on {calibration['images']} copies of its images"
        )
    return f"90 % precision at score_norm >= {p90:.3f} (from {calibration['images']} copies of its images)"


def _footer(out, truth, best, found, flagged, seconds) -> list[str]:
    copies = [t for t in truth if t["is_copy"]]
    copy_scores = sorted(best[t["file"]]["score_norm"] for t in copies if t["file"] in best)
    other_scores = sorted(
        best[t["file"]]["score_norm"] for t in truth if not t["is_copy"] and t["file"] in best
    )
    return [
        "",
        f"planted copies found at rank 0: {found}/{len(copies)}",
        f"flagged as copies (is_copy): {flagged['copies_flagged']}/{len(copies)} planted copies "
        f"({flagged['copies_flagged_on_source']} on their source), {flagged['unrelated_flagged']}/"
        f"{flagged['unrelated']} unrelated images",
        f"top-1 score_norm of planted copies: min {copy_scores[0]:.3f}, median {copy_scores[len(copy_scores) // 2]:.3f}"
        if copy_scores
        else "",
        f"top-1 score_norm of unrelated images: max {other_scores[-1]:.3f}, median {other_scores[len(other_scores) // 2]:.3f}"
        if other_scores
        else "",
        "",
        "outputs:",
        f"  shards (img2dataset):  {out / 'shards'}",
        f"  index + manifest:      {out / 'index'}",
        f"  matches (parquet):     {out / 'scan' / 'matches'}   -> pyarrow.parquet.read_table(...)",
        f"  summary:               {out / 'scan' / 'summary.json'}",
        f"  report (open it):      {out / 'scan' / 'report' / 'report.html'}",
        f"  ground truth:          {out / 'generated' / 'ground_truth.json'}",
        f"  demo took {seconds:.0f} s",
    ]


JOB = Job(
    name="demo",
    summary="the whole path offline on real images: img2dataset, index, calibrate, scan, report",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    uses_ray=False,  # run_demo starts Ray itself, once the images are downloaded
    config_arguments=False,  # its own flags; the index and scan run with default settings
)
