"""Exact re-ranking in the whitened space: stored whitening norms against whitening every candidate again.

Builds a whitened IVF-PQ index (copyscan's default two-stage learned whitening, from stored pairs) over
clustered unit vectors, then times ``ShardSearcher.search`` and ``rerank`` alone with the stored norms
(``manifest.index.whitened_norms``) and with them switched off, as an index built before they existed is
searched. Best of two runs; same queries, same candidates. Prints JSON.

    python -m bench.rerank [--n 40000 --dim 512 --queries 2000 --candidates 100]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from copyscan.indexing.build.ivf import fill_index_shard, train_phase
from copyscan.indexing.build.planner import plan_index
from copyscan.indexing.embed.stage import EmbeddedSource, finished_shards, write_shard_outputs
from copyscan.indexing.store.manifest import build_manifest
from copyscan.search.ann.normalise import whiten
from copyscan.search.ann.searcher import ShardSearcher


def clustered(n: int, d: int, clusters: int, rng: np.random.Generator, noise: float = 0.35) -> np.ndarray:
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    d, n, per_shard = args.dim, args.n, 10_000
    xb = clustered(n, d, max(1, n // 20), rng)
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "idx")
        for shard, start in enumerate(range(0, n, per_shard)):
            part = xb[start : start + per_shard]
            rows = np.repeat(np.arange(min(500, len(part))), 2)
            copies = part[rows] + 0.2 * rng.standard_normal((len(rows), d)).astype(np.float32)
            copies /= np.linalg.norm(copies, axis=1, keepdims=True)
            records = [{"key": f"{shard}-{i}"} for i in range(len(part))]
            result = EmbeddedSource(part, records, [], x_pair=copies, pair_rows=rows)
            write_shard_outputs(out, shard, f"/s/{shard}.tar", result, "bench")
        stats = finished_shards(out)
        counts = {s: st["count"] for s, st in stats.items()}
        plan = plan_index(counts, d, flat_threshold=0)
        info = train_phase(out, plan.factory, counts, train_size=plan.train_size, whitening="learned")
        markers = {
            j: fill_index_shard(out, plan.factory, j, g, True) for j, g in enumerate(plan.shard_groups)
        }
        cfg = {"out": out, "whitening": "learned", "whitening_shrinkage": 0.1, "whitening_pca_shrinkage": 0.3}
        spec = {"name": "synthetic", "dim": d, "preprocess": {"kind": "none"}}
        manifest = build_manifest(
            cfg=cfg, shards=[st["source"] for _, st in sorted(stats.items())], stats=stats, spec=spec,
            plan=plan, markers=markers, train_info=info, timings={}, started_at=0,
        )  # fmt: skip
        xq = xb[: args.queries] + 0.1 * rng.standard_normal((args.queries, d)).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        shards = [e["index_shard"] for e in manifest["index_shards"]]
        result = {
            "bench": "rerank",
            "factory": plan.factory,
            "whitening_stages": manifest["whitening"]["stages"],
            "n": n,
            "dim": d,
            "queries": args.queries,
            "candidates": args.candidates,
            "nprobe": plan.nprobe,
        }
        without = {**manifest, "index": {**manifest["index"], "whitened_norms": False}}
        answers = {}
        for name, m in (("stored_norms", manifest), ("whiten_again", without)):
            searcher = ShardSearcher(out, m, shards, os.path.join(work, f"cache-{name}"))
            xw = whiten(searcher.whitening, xq)
            _, I0 = next(iter(searcher.indexes.values())).search(xw, args.candidates)
            search_s = rerank_s = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                answers[name] = searcher.search(xq, 10, args.candidates, plan.nprobe)
                search_s = min(search_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                searcher.rerank(xq, xw, I0, 10)
                rerank_s = min(rerank_s, time.perf_counter() - t0)
            result[name] = {
                "search_queries_per_s": round(args.queries / search_s, 1),
                "rerank_ms_per_query": round(1000 * rerank_s / args.queries, 4),
            }
        a, b = answers["stored_norms"], answers["whiten_again"]
        result["max_score_difference"] = float(np.abs(a.D - b.D).max())
        result["same_ids"] = float(np.mean(a.I == b.I))
        result["rerank_speedup"] = round(
            result["whiten_again"]["rerank_ms_per_query"] / result["stored_norms"]["rerank_ms_per_query"], 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
