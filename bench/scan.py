"""Scan throughput: queries/s against query count and index size, and peak memory per scan actor. JSON out.

Runs the scan job's search path: ``ScanWorker`` Ray actors (search/scan_ray.py), each a ``ShardSearcher``
over index shards built by ``bench/index.py``'s code (synthetic collections of ``bench/synthetic.py``), fed
query chunks of ``--chunk`` as the scan job broadcasts them, results merged with the job's heap merge.
Query embedding is left out (measured by ``bench/embed_throughput.py``): this is the search side only.

- query scaling: ``--queries`` counts against the largest index;
- index scaling: ``--sizes`` collections, each with the planner's index, at the largest query count;
- memory: each actor's peak resident set after its searches;
- shards per actor (``--shards-per-actor``, instead of the two sweeps above): one actor over the
  ``--sizes`` collection filled into that many index shards (one trained index), searched as the scan does
  (one coarse quantisation per query chunk for all its shards) and as it did before (``PerShardWorker``:
  every shard quantizes on its own), best of ``--repeats`` runs each, alternated; the results are checked
  equal; and the cost of one coarse quantisation per query on one thread (what each extra shard added).

    python -m bench.scan --base /tmp/bench_cd/index-whitening_pair_images=400 --work /tmp/bs \
        --sizes 100000 300000 1000000 --queries 1000 4000 16000
    python -m bench.scan --base /tmp/bench_cd/index-whitening_pair_images=400 --work /tmp/bs \
        --sizes 200000 --part 25000 --shards-per-actor 1 2 4 8 --queries 4000

- end to end (``--end-to-end``, instead of all the above; ``--base`` unused): the whole ``copyscan scan`` job
  (embedding included) of ``--generations`` generated images against an index of ``--train`` real images,
  on a local Ray of ``--cpus`` CPUs, once per code tree of ``--trees`` (e.g. main's checkout and this one,
  each run in its own process with that tree first on the path) and per ``--embed-actors`` value (0 = the
  scan's default), alternated: queries/s, and CPU utilisation = CPU seconds of the scan's processes (the
  driver, Ray's and its workers', read from /proc) / (wall seconds × CPUs); every run's matches compared
  with the first's, and the driver's own CPU seconds. ``--index`` and ``--query-folder`` scan an index of
  one's own instead (one with a region index, for partial-copy scans; ``--scan`` for their settings).

    PYTHONPATH=. python bench/scan.py --end-to-end --work /tmp/bs-e2e --trees /tmp/main-tree . \
        --embed-actors 0 1 2 4 --scan torch_threads=1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.cpu import CpuSampler
from bench.index import PART, build, write_collection
from bench.synthetic import LocalKDE, load_real
from copyscan.indexing.build.planner import plan_index
from copyscan.jobs._runtime import init_ray
from copyscan.search.ann.coarse import SharedCoarse
from copyscan.search.ann.topk import merge_topk
from copyscan.search.scan_ray import ScanWorker, assign_shards

K = 10


class PerShardWorker(ScanWorker):
    """The scan path before one coarse quantisation per actor: every index shard searched on its own,
    with its own copy of the centroids."""

    def __init__(self, *args: Any) -> None:
        SharedCoarse.of = classmethod(lambda cls, indexes: None)  # this actor's process only
        super().__init__(*args)


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


def _collection_args(args: argparse.Namespace, n: int, shard_vectors: int) -> argparse.Namespace:
    return argparse.Namespace(
        n=n,
        queries=1_000,
        base=args.base,
        dup_group_mean=1.4,
        dup_spread=0.25,
        seed=args.seed,
        part=args.part,
        shard_vectors=shard_vectors,
        max_code_bytes=64,
        whitening="none",
    )


def by_shards_per_actor(args: argparse.Namespace, xq: np.ndarray) -> list[dict[str, Any]]:
    """Queries/s of one actor over the collection split into 1, 2, … index shards: shared coarse
    quantisation against per-shard (the scan before). Fills run with no actor alive."""
    import faiss
    import ray

    from copyscan.indexing.build.ivf import read_index
    from copyscan.indexing.store import layout

    n = max(args.sizes)
    ns = _collection_args(args, n, n)
    out = os.path.join(args.work, f"n{n}" if args.part == PART else f"n{n}-part{args.part}", "index")
    counts, _, _ = write_collection(ns, out)
    plan = plan_index(counts, 512, flat_threshold=0, recall_target=args.recall_target)
    rows = []
    for shards in sorted(args.shards_per_actor):
        ns.shard_vectors = -(-n // shards)
        manifest, build_seconds = build(out, plan.factory, counts, 512, ns)
        if len(manifest["index_shards"]) != shards:
            raise SystemExit(f"{n} vectors in parts of {args.part} cannot make {shards} index shards")
        group = [e["index_shard"] for e in manifest["index_shards"]]
        cache = os.path.join(args.work, "cache")
        best = {"shared": np.inf, "per_shard": np.inf}
        memory: dict[str, int] = {}
        first: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for path, worker in (("shared", ScanWorker), ("per_shard", PerShardWorker)):
                actor = ray.remote(worker).remote(out, manifest, group, cache, None)
                ray.get(actor.ready.remote())
                ref = ray.put(np.ascontiguousarray(xq[: args.chunk]))
                first[path] = ray.get(actor.search.remote(ref, K, plan.candidates, plan.nprobe)).I  # warm
                best[path] = min(best[path], scan([actor], xq, args.chunk, plan.candidates, plan.nprobe))
                memory[path] = ray.get(actor.memory.remote())["peak_rss_bytes"]
                ray.kill(actor, no_restart=True)
        row = {
            "index_vectors": n,
            "factory": plan.factory,
            "nprobe": plan.nprobe,
            "candidates": plan.candidates,
            "index_shards_per_actor": shards,
            "queries": len(xq),
            "queries_per_s": round(len(xq) / best["shared"], 1),
            "queries_per_s_per_shard_quantisation": round(len(xq) / best["per_shard"], 1),
            "speedup": round(best["per_shard"] / best["shared"], 3),
            "peak_rss_bytes": memory["shared"],
            "peak_rss_bytes_per_shard_quantisation": memory["per_shard"],
            "same_results": bool(np.array_equal(first["shared"], first["per_shard"])),
            "build_seconds": build_seconds,
        }
        trained = read_index(layout.trained_index_url(out, plan.factory))
        quantizer = faiss.extract_index_ivf(trained).quantizer  # a view into ``trained``: keep both
        row["coarse_ms_per_query_per_shard"] = round(
            1e3 * coarse_seconds(quantizer, xq, plan.nprobe, args.repeats + 2), 4
        )
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def coarse_seconds(quantizer, xq: np.ndarray, nprobe: int, repeats: int) -> float:
    """Seconds per query of one coarse quantisation by ``quantizer`` (1 thread as in a scan actor, a
    chunk of 1,024): what each extra index shard cost per query before it was shared."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    x = np.ascontiguousarray(xq[:1024], dtype=np.float32)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        quantizer.search(x, nprobe)
        best = min(best, time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads)
    return best / len(x)


def coarse_at_scale(nlists: list[int], xq: np.ndarray, repeats: int) -> list[dict[str, Any]]:
    """Coarse quantisation cost per query at LAION-size nlist (random unit centroids: the cost of a flat
    inner-product search does not depend on their values), nprobe = nlist / 512 as the planner sets it."""
    import faiss

    rows = []
    rng = np.random.default_rng(0)
    for nlist in nlists:
        quantizer = faiss.IndexFlatIP(xq.shape[1])
        for start in range(0, nlist, 65_536):
            c = rng.standard_normal((min(65_536, nlist - start), xq.shape[1]), dtype=np.float32)
            quantizer.add(c / np.linalg.norm(c, axis=1, keepdims=True))
        nprobe = max(8, nlist // 512)
        seconds = coarse_seconds(quantizer, xq, nprobe, repeats)
        rows.append({"nlist": nlist, "nprobe": nprobe, "ms_per_query_1_thread": round(1e3 * seconds, 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _e2e_data(work: pathlib.Path, train: int, generations: int) -> tuple[str, str]:
    """An index of ``train`` real images (img2dataset shards from a loopback server, ``copyscan index``
    with its defaults) and ``generations`` generated images, half copies of training images; built once."""
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.jobs._runtime import setup_logging
    from copyscan.jobs.demo import data as demo_data
    from copyscan.jobs.demo.sample_images import real_image_files

    index, queries = work / "index", work / "generations"
    if (index / "manifest.json").exists() and len(list(queries.glob("*.jpg"))) == generations:
        return str(index), str(queries)
    setup_logging()
    files = real_image_files(train + generations // 2)
    staged = demo_data.stage_images(files[:train], work / "www")
    with demo_data.serve_directory(work / "www") as base_url:
        url_list = demo_data.write_url_list(
            staged, base_url, str(work / "url_list.parquet"), root=work / "www"
        )
        demo_data.run_img2dataset(url_list, str(work / "shards"), number_sample_per_shard=250, thread_count=8)
    init_ray()
    run_index(resolve(IndexConfig, {"shards": str(work / "shards"), "out": str(index)}))
    demo_data.make_generated_images(
        staged,
        files[train:],
        str(queries),
        n_copies=generations // 2,
        n_unrelated=generations - generations // 2,
        seed=0,
    )
    import ray

    ray.shutdown()
    return str(index), str(queries)


def end_to_end(args: argparse.Namespace) -> dict[str, Any]:
    """Whole scans, one child process each (``_one_scan``), code trees alternated per setting."""
    import pyarrow.parquet as pq

    work = pathlib.Path(args.work)
    if args.index:  # an index and query folder of one's own (e.g. one with a region index)
        index, queries = args.index, args.query_folder
    else:
        index, queries = _e2e_data(work, args.train, args.generations)
    runs, first = [], None
    for actors in args.embed_actors:
        for tree in args.trees:
            tree = str(pathlib.Path(tree).resolve())
            out = work / f"scan-{len(runs)}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            spec = {"index": index, "queries": queries, "out": str(out), "cpus": args.cpus}
            spec["overrides"] = [f"embed_actors={actors}", *args.scan]
            env = {**os.environ, "PYTHONPATH": tree, "RAY_DEDUP_LOGS": "0"}
            child = subprocess.run(
                [sys.executable, __file__, "--work", args.work, "--one", json.dumps(spec)],
                env=env,
                cwd=tree,
                capture_output=True,
                text=True,
            )
            if child.returncode:
                raise SystemExit(f"scan with {tree} failed:\n{child.stderr[-4000:]}")
            row = {"tree": tree, "embed_actors": actors, **json.loads(child.stdout.strip().splitlines()[-1])}
            table = pq.read_table(
                out / "matches", columns=["query_id", "rank", "train_key", "score", "score_norm"]
            )
            table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
            first = table if first is None else first
            row["same_matches_as_first_run"] = table.equals(first)
            print(json.dumps(row), file=sys.stderr)
            runs.append(row)
    return {
        "bench": "scan_end_to_end",
        "index": index,
        "train_images": args.train if not args.index else None,
        "generations": args.generations if not args.index else None,
        "ray_cpus": args.cpus,
        "machine_cpus": os.cpu_count(),
        "machine": f"{os.cpu_count()}-core CPU VM; trees alternated per setting",
        "note": args.note,
        "scan_overrides": args.scan,
        "runs": runs,
    }


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _one_scan(spec: dict[str, Any]) -> int:
    """One ``copyscan scan`` on a fresh local Ray of ``spec["cpus"]`` CPUs: its wall and CPU seconds (JSON)."""
    import ray

    from copyscan.indexing.runtime.config import parse_overrides, resolve
    from copyscan.jobs._runtime import setup_logging
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    setup_logging()
    ray.init(num_cpus=spec["cpus"], include_dashboard=False)
    cfg = resolve(
        ScanConfig,
        {"index": spec["index"], "queries": spec["queries"], "out": spec["out"]},
        parse_overrides(spec["overrides"]),
    )
    load = os.getloadavg()[0]
    sampler = CpuSampler(os.getpid())
    t0, driver0 = time.perf_counter(), _own_cpu_seconds()
    summary = run_scan(cfg)
    wall = time.perf_counter() - t0
    driver = _own_cpu_seconds() - driver0
    cpu = sampler.stop()
    ray.shutdown()
    queries = int(summary["queries"])
    print(
        json.dumps(
            {
                "queries": queries,
                "seconds": round(wall, 2),
                "queries_per_s": round(queries / wall, 2),
                "cpu_seconds": round(cpu, 1),
                "cpu_utilisation": round(cpu / (wall * spec["cpus"]), 3),
                "driver_cpu_seconds": round(driver, 1),  # the driver process alone, all its threads
                "load_average_before": round(load, 2),
                "load_average_after": round(os.getloadavg()[0], 2),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="", help="a copyscan index of real images (with pairs)")
    parser.add_argument("--work", required=True, help="work folder (collections and indexes are kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--queries", type=int, nargs="+", default=[1_000, 4_000, 16_000])
    parser.add_argument("--actors", type=int, default=1, help="scan actors per index")
    parser.add_argument("--shard-vectors", type=int, default=1_000_000, help="vectors per index shard")
    parser.add_argument("--chunk", type=int, default=1024, help="queries per chunk (scan chunk_size)")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", type=int, default=PART, help="vectors per embedding shard")
    parser.add_argument("--repeats", type=int, default=3, help="shards per actor: best of this many runs")
    parser.add_argument(
        "--coarse-nlist",
        type=int,
        nargs="*",
        default=[],
        help="time one coarse quantisation per query at these nlist (e.g. 262144), alone or with "
        "--shards-per-actor",
    )
    parser.add_argument(
        "--shards-per-actor",
        type=int,
        nargs="+",
        default=[],
        help="instead of the query and size sweeps: the largest --sizes collection in this many index "
        "shards, one actor, shared against per-shard coarse quantisation",
    )
    parser.add_argument("--end-to-end", action="store_true", help="the whole scan job: see the docstring")
    parser.add_argument("--train", type=int, default=1000, help="end to end: training images indexed")
    parser.add_argument("--generations", type=int, default=250, help="end to end: generated images scanned")
    parser.add_argument("--cpus", type=int, default=2, help="end to end: CPUs of the local Ray")
    parser.add_argument("--trees", nargs="+", default=["."], help="end to end: code trees compared")
    parser.add_argument("--embed-actors", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument(
        "--scan", action="append", default=[], metavar="KEY=VALUE", help="end to end: a scan config override"
    )
    parser.add_argument("--index", default="", help="end to end: scan this index instead of building one")
    parser.add_argument("--query-folder", default="", help="end to end, with --index: this folder of images")
    parser.add_argument("--note", default="", help="end to end: a note kept in the JSON (the machine's load)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # end to end: one scan, in a child process
    args = parser.parse_args(argv)
    if args.one:
        return _one_scan(json.loads(args.one))
    if args.end_to_end:
        print(json.dumps(end_to_end(args), indent=2))
        return 0
    xq_all = _queries(args, max(args.queries))
    machine = "shared 2-core CPU VM (other jobs running): timings are contended"
    if args.shards_per_actor or args.coarse_nlist:
        if args.shards_per_actor:
            init_ray(num_cpus=os.cpu_count() or 1)
        sweep = {
            "bench": "scan_shards_per_actor" if args.shards_per_actor else "scan_coarse",
            "k": K,
            "chunk": args.chunk,
            "cpus": os.cpu_count(),
            "machine": machine,
            "repeats": f"best of {args.repeats}" + (" per path, alternated" if args.shards_per_actor else ""),
            "queries": "half copies of fresh images (real copy noise), half fresh draws (bench/synthetic.py)",
            "by_shards_per_actor": by_shards_per_actor(args, xq_all) if args.shards_per_actor else [],
            "coarse_quantisation": coarse_at_scale(args.coarse_nlist, xq_all, args.repeats),
        }
        print(json.dumps(sweep, indent=2))
        return 0
    built = []  # every collection and index first: no Ray workers competing with the numpy work
    for n in sorted(args.sizes):
        ns = _collection_args(args, n, args.shard_vectors)
        out = os.path.join(args.work, f"n{n}" if args.part == PART else f"n{n}-part{args.part}", "index")
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
        "machine": machine,
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
