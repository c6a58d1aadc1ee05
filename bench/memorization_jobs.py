"""``bench.memorization --copyscan-jobs``: the bench's saved checkpoint through the jobs a user runs
(``copyscan generate``, ``memorized``, ``index`` and ``scan`` on a local Ray cluster)."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.memorization import Caption, roc_auc


def copyscan_jobs(
    folder: str, images: np.ndarray, captions: list[Caption], args: argparse.Namespace, work: str
) -> dict:
    """The same checkpoint through the jobs a user runs: ``copyscan generate`` (the bench's sampling
    settings and seed), ``copyscan memorized`` (``min_clique``) on its shards, and ``copyscan scan`` of
    those shards against an index (default settings) of the distinct training images (img2dataset shards
    made over a loopback HTTP server, at ``size`` px; ``threshold=somepalli``). Per group: prompts flagged by a clique, and the
    share of generations whose best match is their caption's own training image, and flagged a copy."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.jobs._runtime import init_ray
    from copyscan.jobs.demo import data as demo_data
    from copyscan.search.generate.config import GenerateConfig
    from copyscan.search.generate.generate_ray import run_generate
    from copyscan.search.memorized.config import MemorizedConfig
    from copyscan.search.memorized.memorized_ray import run_memorized
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    init_ray()
    t0 = time.perf_counter()
    # an index this small is not calibrated: Somepalli et al.'s fixed threshold, score_raw >= 0.5
    scan_keys = {"threshold": "somepalli"}
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.writelines(f"{c.text}\n" for c in captions)
    gen = os.path.join(work, "gen")
    keys = {"checkpoint": folder, "prompts": prompts, "out": gen, "per_prompt": args.per_prompt}
    keys |= {"steps": args.sample_steps, "guidance": args.guidance, "width": args.size, "height": args.size}
    run_generate(resolve(GenerateConfig, {**keys, "scheduler": "ddim", "seed": args.seed}))
    mem = os.path.join(work, "memorized")
    run_memorized(
        resolve(MemorizedConfig, {"generations": f"{gen}/shards", "out": mem, "min_clique": args.min_clique})
    )
    flagged = {r["prompt"] for r in pq.read_table(f"{mem}/memorized.parquet").to_pylist() if r["flagged"]}

    files = []
    os.makedirs(os.path.join(work, "train"), exist_ok=True)
    for i, a in enumerate(images):
        files.append(os.path.join(work, "train", f"{i:05d}.png"))
        Image.fromarray(a).save(files[-1])
    staged = demo_data.stage_images(files, os.path.join(work, "www"))
    with demo_data.serve_directory(os.path.join(work, "www")) as base_url:
        url_list = demo_data.write_url_list(staged, base_url, f"{work}/urls.parquet", root=f"{work}/www")
        demo_data.run_img2dataset(url_list, f"{work}/shards", image_size=args.size, thread_count=4)
    key_of = demo_data.source_keys(f"{work}/shards")
    image_of_key = {key_of[p.relative_to(f"{work}/www").as_posix()]: i for i, p in enumerate(staged)}
    run_index(resolve(IndexConfig, {"shards": f"{work}/shards", "out": f"{work}/index"}))
    run_scan(
        resolve(
            ScanConfig,
            {"index": f"{work}/index", "queries": f"{gen}/shards", "out": f"{work}/scan", **scan_keys},
        )
    )
    table = pq.read_table(f"{work}/scan/matches")
    top = (
        table.filter(pc.equal(table["rank"], 0))
        .select(["prompt", "train_key", "is_copy", "score_raw"])
        .to_pylist()
    )

    raw = {c.text: np.mean([r["score_raw"] for r in top if r["prompt"] == c.text]) for c in captions}

    def group(memorised: bool) -> dict:
        caps = [c for c in captions if c.memorised == memorised]
        own = {c.text: set(c.images) for c in caps}
        rows = [r for r in top if r["prompt"] in own]
        is_own = [image_of_key.get(r["train_key"]) in own[r["prompt"]] for r in rows]
        return {
            "prompts": len(caps),
            "memorized_flagged": sum(c.text in flagged for c in caps),
            "generations": len(rows),
            "best_match_is_own": float(np.mean(is_own)),
            "best_score_raw_mean": float(np.mean([raw[c.text] for c in caps])),
            # the 'duplicate' level (score_raw >= 0.95) on the same rows
            "score_raw_at_least_0.95": float(np.mean([r["score_raw"] >= 0.95 for r in rows])),
            "flagged_copy": float(np.mean([bool(r["is_copy"]) for r in rows])),
            "flagged_copy_of_own": float(
                np.mean([o and bool(r["is_copy"]) for o, r in zip(is_own, rows, strict=True)])
            ),
        }

    return {
        "scan_threshold": scan_keys["threshold"],
        "auc_best_score_raw": roc_auc(
            [raw[c.text] for c in captions if c.memorised], [raw[c.text] for c in captions if not c.memorised]
        ),
        "memorised": group(True),
        "others": group(False),
        "seconds": round(time.perf_counter() - t0, 1),
    }
