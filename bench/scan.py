"""Scan throughput: queries/s against query count and index size, and peak memory per scan actor. JSON out.

Runs the scan job's search path: ``ScanWorker`` Ray actors (search/scan_ray.py), each a ``ShardSearcher``
over index shards built by ``bench/index.py``'s code (synthetic collections of ``bench/synthetic.py``), fed
query chunks of ``--chunk`` as the scan job broadcasts them, results merged with the job's heap merge.
Query embedding is left out (measured by ``bench/embed_throughput.py``): this is the search side only.

- query scaling: ``--queries`` counts against the largest index;
- index scaling: ``--sizes`` collections, each with the planner's index, at the largest query count;
- memory: each actor's peak resident set after its searches.

    python -m bench.scan --base /tmp/bench_cd/index-whitening_pair_images=400 --work /tmp/bs \
        --sizes 100000 300000 1000000 --queries 1000 4000 16000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from bench.index import build, write_collection
from bench.synthetic import LocalKDE, load_real
from indexing.planner import plan_index
from jobs._runtime import init_ray
from search.merge import merge_topk
from search.scan_ray import ScanWorker, assign_shards

K = 10


def _queries(args: argparse.Namespace, count: int) -> np.ndarray:
    """(count, d) float32: half fresh draws, half copies of new images (what generations look like)."""
    rng = np.random.default_rng(args.seed + 7)
    model = LocalKDE.fit(*load_real(args.base))
    half = count // 2
    return np.concatenate([model.copies(model.images(half, rng), 1.0, rng), model.images(count - half, rng)])


def scan(actors: list, xq: np.ndarray, chunk: int, candidates: int, nprobe: int) -> float:
    """Seconds to search ``xq`` in chunks of ``chunk``, every chunk on every actor, merged (scan_ray's path)."""
    import ray

    t0 = time.perf_counter()
    pending = []
    for start in range(0, len(xq), chunk):
        ref = ray.put(np.ascontiguousarray(xq[start : start + chunk]))
        pending.append([a.search.remote(ref, K, candidates, nprobe) for a in actors])
    for refs in pending:
        parts = ray.get(refs)
        merge_topk([(p.D, p.I) for p in parts], K)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="a copyscan index of real images (with pairs)")
    parser.add_argument("--work", required=True, help="work folder (collections and indexes are kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1_000, 4_000, 16_000])
    parser.add_argument("--actors", type=int, default=1, help="scan actors per index")
    parser.add_argument("--shard-vectors", type=int, default=1_000_000, help="vectors per index shard")
    parser.add_argument("--chunk", type=int, default=1024, help="queries per chunk (scan chunk_size)")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    xq_all = _queries(args, max(args.queries))
    built = []  # every collection and index first: no Ray workers competing with the numpy work
    for n in sorted(args.sizes):
        ns = argparse.Namespace(
            n=n,
            queries=1_000,
            base=args.base,
            dup_group_mean=1.4,
            dup_spread=0.25,
            seed=args.seed,
            shard_vectors=args.shard_vectors,
            max_code_bytes=64,
            whitening="none",
        )
        out = os.path.join(args.work, f"n{n}", "index")
        counts, _, _ = write_collection(ns, out)
        plan = plan_index(counts, 512, flat_threshold=0, recall_target=args.recall_target)
        manifest, seconds = build(out, plan.factory, counts, 512, ns)
        built.append((n, out, plan, manifest, seconds))
    init_ray(num_cpus=os.cpu_count() or 1)
    import ray

    result: dict[str, Any] = {
        "bench": "scan",
        "k": K,
        "chunk": args.chunk,
        "actors_per_index": args.actors,
        "cpus": os.cpu_count(),
        "machine": "shared 2-core CPU VM (other jobs running): timings are contended",
        "queries": "half copies of fresh images (real copy noise), half fresh draws (bench/synthetic.py)",
        "by_query_count": [],
        "by_index_size": [],
    }
    largest = max(args.sizes)
    for n, out, plan, manifest, seconds in built:
        groups = assign_shards(manifest, args.actors)
        cache = os.path.join(args.work, "cache")
        actors = [ray.remote(ScanWorker).remote(out, manifest, g, cache, None) for g in groups]
        ray.get([a.ready.remote() for a in actors])
        scan(actors, xq_all[: args.chunk], args.chunk, plan.candidates, plan.nprobe)  # warm
        for nq in args.queries if n == largest else [max(args.queries)]:
            seconds_scan = scan(actors, xq_all[:nq], args.chunk, plan.candidates, plan.nprobe)
            memory = ray.get([a.memory.remote() for a in actors])
            row = {
                "index_vectors": n,
                "factory": plan.factory,
                "nprobe": plan.nprobe,
                "candidates": plan.candidates,
                "index_shards": len(manifest["index_shards"]),
                "queries": nq,
                "seconds": round(seconds_scan, 3),
                "queries_per_s": round(nq / seconds_scan, 1),
                "peak_rss_per_actor_bytes": [m["peak_rss_bytes"] for m in memory],
                "faiss_threads_per_actor": [m["omp_threads"] for m in memory],
                "build_seconds": seconds,
            }
            print(json.dumps(row), file=sys.stderr)
            if n == largest:
                result["by_query_count"].append(row)
            if nq == max(args.queries):
                result["by_index_size"].append(row)
        for a in actors:
            ray.kill(a, no_restart=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
