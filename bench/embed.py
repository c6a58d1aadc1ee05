"""The embedding pipeline against the bare model, on the same images and the same cores. Prints JSON.

For the index path (img2dataset shards) and the scan's query path (a folder of generations):

- ``bare``: ``Embedder.embed`` alone on pre-decoded uint8 batches in this process, on ``--cpus`` cores: the
  better of one stream of batches on ``--cpus`` torch threads and ``--cpus`` streams of one thread each (both
  are given), i.e. what the model costs when nothing else runs;
- ``pipeline``: the job itself on a local Ray of ``--cpus`` CPUs with its default settings (tar read via
  fsspec → decode tasks → embedding actors → per-shard outputs and markers). ``job``: the whole job, so it
  includes the fixed cost of starting (Ray workers, the model, the index; ``start_seconds`` for the index);
  for the index also ``steady``: images over the time from the first shard's embedding call to the last
  one's end, taken from the shards' stats. Each job's CPU is accounted for by kind of process
  (``cpu_seconds_by_process``: the embedding actor, the decode tasks, the driver, Ray's own processes, workers
  starting up as ``IDLE``; ``bench/cpu.py``) with the core-seconds left idle;
- ``warm``: each path on one warm embedding actor, every pass between two passes of that actor's own model
  (``warm_paths``): no start, and the bare model within seconds of the path in the same process, so the VM's
  drift mostly cancels out of each pass's ``path_over_bare``;
- ``profile``: each step alone on one core: tar read (fsspec + webdataset), decode + preprocess into model
  input (``decode_samples``; for the generations as the scan decodes them, reduced), and writing a shard's
  outputs.

``path_over_bare`` (``warm``) and ``steady_over_bare`` (the index job; the bare model is timed before and
after the jobs and the mean taken, since this VM's speed drifts over minutes) are the figures the throughput
issue targets (≥ 0.9); ``job_over_bare`` says what the start costs a job of this size. ``bound_over_bare``
is what a path could reach if decoding shared the model's cores at no cost beyond its own CPU time: the
model takes ``cpus / bare`` core-seconds an image and decoding ``1 / decode`` (the profile's one-core rate),
so at best ``1 / (1 + bare / (cpus · decode))`` of the bare rate; where decoding has cores of its own (CPU
workers beside GPU actors) the bound is 1. The data: ``--images`` real images (the tests' corpus of
Debian packages, repeated when more are asked for than it has) written as img2dataset-layout shards of
``--per-shard`` JPEGs with their short side at ``--side`` px (img2dataset's default 256), and the first
``--queries`` of them as generations (``--query-side`` px JPEGs, the size of a diffusion model's output).

    python -m bench.embed --images 2048 --queries 512 --cpus 2
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.cpu import CpuSampler

# distinct images in the default (art) corpus that the bench takes: beyond it, images repeat
CORPUS = 1800


def _jpeg(path: Path, side: int) -> bytes:
    from copyscan.indexing.read.images import open_rgb

    img = open_rgb(path)
    scale = side / min(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_data(
    images: list[Path], work: Path, per_shard: int, side: int, query_side: int, queries: int | None = None
) -> dict[str, Any]:
    """img2dataset-layout shards (``{key}.jpg/.txt/.json``) and a folder of query JPEGs of the first
    ``queries`` (default: all) of the same images."""
    shards_dir, queries_dir = work / "shards", work / "queries"
    shards_dir.mkdir(parents=True, exist_ok=True)
    queries_dir.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, start in enumerate(range(0, len(images), per_shard)):
        url = shards_dir / f"{shard:05d}.tar"
        with tarfile.open(url, "w") as tar:
            for i, path in enumerate(images[start : start + per_shard]):
                key = f"{shard:05d}{i:04d}"
                _add(tar, f"{key}.jpg", _jpeg(path, side))
                _add(tar, f"{key}.txt", path.stem.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{path.name}"}).encode())
        urls.append(str(url))
    for i, path in enumerate(images[:queries]):
        (queries_dir / f"gen_{i:05d}.jpg").write_bytes(_jpeg(path, query_side))
    return {"shards": urls, "queries": str(queries_dir)}


def corpus_shards(
    work: Path, n: int, per_shard: int = 256, side: int = 256, query_side: int = 512, queries: int = 0
) -> dict[str, Any]:
    """``write_data`` of ``n`` real images (the packaged corpus, repeated past its size) into ``work``
    (also the GPU machine's shards: ``make device-carry``)."""
    from copyscan.jobs.demo.sample_images import real_image_files

    corpus = real_image_files(min(n, CORPUS))
    return write_data([corpus[i % len(corpus)] for i in range(n)], work, per_shard, side, query_side, queries)


def _decoded(embedder: Any, shards: list[str]) -> list[np.ndarray]:
    from copyscan.indexing.embed.decode import decode_samples
    from copyscan.indexing.read.reader import iter_tar

    out = []
    for url in shards:
        for batch in decode_samples(iter_tar(url), embedder.preprocess, 64, image_size=embedder.image_size):
            out.append(batch.pixels)
    return out


def bare(embedder: Any, batches: list[np.ndarray], repeats: int, cpus: int) -> dict[str, Any]:
    """Best of ``repeats`` passes of the model over ``batches`` (after one warm-up batch), as one stream on
    ``cpus`` threads and as ``cpus`` streams (Python threads) of one torch thread each; the better one."""
    embedder.embed(batches[0])
    n = sum(len(b) for b in batches)

    def streams(count: int) -> None:
        parts = [batches[i::count] for i in range(count)]
        workers = [
            threading.Thread(target=lambda p: [embedder.embed(b) for b in p], args=(p,)) for p in parts
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    torch.set_num_threads(cpus)
    one = min(_timed(lambda: [embedder.embed(b) for b in batches]) for _ in range(repeats))
    torch.set_num_threads(1)
    many = min(_timed(lambda: streams(cpus)) for _ in range(repeats))
    torch.set_num_threads(cpus)
    best = min(one, many)
    return {
        "images": n,
        "seconds": round(best, 3),
        "images_per_s": round(n / best, 2),
        f"one_stream_{cpus}_threads_images_per_s": round(n / one, 2),
        f"{cpus}_streams_1_thread_images_per_s": round(n / many, 2),
    }


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(embedder: Any, shards: list[str], work: Path) -> dict[str, Any]:
    """Each step of the pipeline alone, on this process's one thread: images/s."""
    from copyscan.indexing.embed.decode import decode_samples
    from copyscan.indexing.embed.stage import EmbeddedSource, write_shard_outputs
    from copyscan.indexing.read.reader import iter_tar

    n = 0
    t_read = _timed(lambda: [None for url in shards for _ in iter_tar(url)])
    batches: list[Any] = []

    def decode() -> None:
        for url in shards:
            batches.extend(
                decode_samples(iter_tar(url), embedder.preprocess, 64, image_size=embedder.image_size)
            )

    t_decode = _timed(decode) - t_read
    n = sum(len(b.pixels) for b in batches)
    x = np.random.default_rng(0).standard_normal((n, embedder.dim)).astype(np.float32)
    records = [r for b in batches for r in b.records]
    out = str(work / "profile-write")
    t_write = _timed(lambda: write_shard_outputs(out, 0, shards[0], EmbeddedSource(x, records, []), "bench"))
    rate = lambda seconds: round(n / seconds, 1) if seconds > 0 else None  # noqa: E731
    return {
        "images": n,
        "tar_read_images_per_s": rate(t_read),
        "decode_preprocess_images_per_s": rate(t_decode),
        "write_images_per_s": rate(t_write),
    }


def _cpu_use(sampler: CpuSampler, cpu: float, job: float, cpus: int) -> dict[str, Any]:
    """Where a job's CPU went: core-seconds of its processes by kind (``bench.cpu.process_kind``: the
    embedding actor, the decode tasks, the driver, Ray's own processes) and the core-seconds left idle."""
    return {
        "cpu_seconds": round(cpu, 2),
        "idle_core_seconds": round(max(0.0, cpus * job - cpu), 2),
        "cpu_seconds_by_process": sampler.by_kind(),
    }


def pipeline_index(
    shards: list[str],
    work: Path,
    batch: int,
    repeats: int,
    cpus: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The index job (flat index, no whitening), best of ``repeats`` fresh runs: the whole job, its embed
    phase (manifest timings) and its steady rate from the shards' stats (first call's start to last end)."""
    import copyscan

    runs = []
    for r in range(repeats):
        out = work / f"index-{r}"
        sampler = CpuSampler(os.getpid())
        t0 = time.time()
        manifest = copyscan.index(
            str(Path(shards[0]).parent / "*.tar"),
            str(out),
            whitening="none",
            index_factory="Flat",
            batch_size=batch,
            mode="overwrite",
            **(overrides or {}),
        )
        job = time.time() - t0
        cpu = sampler.stop()
        stats = [json.loads(p.read_text()) for p in sorted((out / "embeddings" / "stats").glob("*.json"))]
        first = min(s["started"] for s in stats)
        last = max(s["started"] + s["wall_seconds"] for s in stats)
        n = int(manifest["ntotal"])
        runs.append(
            {
                "images": n,
                "job_seconds": round(job, 3),
                "embed_phase_seconds": float(manifest["timings"]["embed"]),
                "start_seconds": round(first - t0, 3),
                "steady_seconds": round(last - first, 3),
                "images_per_s": round(n / job, 2),
                "steady_images_per_s": round(n / (last - first), 2),
                **_cpu_use(sampler, cpu, job, cpus),
            }
        )
    return max(runs, key=lambda run: run["steady_images_per_s"])


def pipeline_scan(
    index: str,
    queries: str,
    work: Path,
    batch: int,
    repeats: int,
    cpus: int,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The scan job (one chunk: every query in it, embedded in pieces) against a flat index, best of
    ``repeats`` fresh runs: the whole job (starting its actors, loading the index, embedding, searching,
    writing). The query path alone is ``warm_paths``'s (the chunk's pieces overlap on the actor, so the
    marker's model and decode-wait seconds add up to more than the time they took)."""
    import copyscan

    runs = []
    for r in range(repeats):
        out = work / f"scan-{r}"
        sampler = CpuSampler(os.getpid())
        t0 = time.time()
        summary = copyscan.scan(
            index, queries, str(out), batch_size=batch, mode="overwrite", **(overrides or {})
        )
        job = time.time() - t0
        cpu = sampler.stop()
        n = int(summary["embedded"])
        runs.append(
            {
                "images": n,
                "chunks": len(list((out / "chunks").glob("*.json"))),
                "job_seconds": round(job, 3),
                "images_per_s": round(n / job, 2),
                **_cpu_use(sampler, cpu, job, cpus),
            }
        )
    return max(runs, key=lambda run: run["images_per_s"])


def warm_paths(
    embedder: str,
    shards: list[str],
    queries: list[Path],
    batches: list[np.ndarray],
    work: Path,
    batch: int,
    repeats: int,
) -> dict[str, Any]:
    """Both embedding paths on one warm embedding actor of ``embedder``, each pass between two passes of
    that actor's own model over pre-decoded ``batches``: no job start in the figure, and the bare model timed
    in the same process and within seconds of the path, so the VM's drift cancels out of each pass's ratio.

    Made as the jobs make theirs (``make_embed_actor`` with the jobs' default settings, read from their
    configs: CPUs per actor, calls in flight, the actor's torch threads, CPUs per decode task): the index
    path is ``embed_shard`` of every shard, that many in flight (tar read, decode, model, writing the shard's
    outputs and marker); the scan's query path is ``embed_images`` of the generations in the scan's pieces
    (``plan_pieces`` for one actor), as many in flight, JPEGs decoded reduced (``jpeg_draft``). Per pass:
    the path's images/s over the mean of the bare passes before and after it; the median of ``repeats``.
    Before each pass, as many decode workers as calls in flight are made to exist (tasks of a decode task's
    CPUs, held together for a moment), as a job starts them while its actors load: Ray ends idle workers
    beyond the CPUs left free after a second, so during the bare passes one of the two was ended and each
    pass waited 0.5–0.6 s for a fresh one (traced: its first batch 0.57–0.78 s into the pass against 0.13 s
    with both workers kept), which is a job's start, not its path."""
    import ray

    from copyscan.indexing.embed.decode import DecodeLimits
    from copyscan.indexing.embed.embed_ray import EmbedWorker, embed_actor_options
    from copyscan.indexing.embed.fanout import MIN_IN_FLIGHT
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.search.scan_chunks import QueryChunk
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_pieces import plan_pieces

    settings = ("embed_actor_cpus", "embed_concurrency", "torch_threads", "decode_cpus")
    defaults = [{f.name: f.default for f in dataclasses.fields(c)} for c in (IndexConfig, ScanConfig)]
    actor_cpus, concurrency, torch_threads, decode_cpus = (defaults[0][k] for k in settings)
    if any(defaults[0][k] != defaults[1][k] for k in settings):  # one actor stands for both jobs' actors
        raise SystemExit(f"the index's and the scan's default actor settings differ: {defaults}")
    # 0: from the measured rates (indexing/embed/fanout.py), which keep 2 on a CPU actor (the model is the
    # slower): the actor runs that many calls at once, as the jobs' pools give it
    concurrency = concurrency or MIN_IN_FLIGHT

    class Probe(EmbedWorker):
        def bare(self, batches: list[np.ndarray]) -> float:
            t0 = time.perf_counter()
            for b in batches:
                self.embedder.embed(b)
            return sum(len(b) for b in batches) / (time.perf_counter() - t0)

    actor = (
        ray.remote(Probe)
        .options(**embed_actor_options(actor_cpus, 0, concurrency))
        .remote(embedder, None, None, "cpu", torch_threads, decode_cpus, None)
    )
    held = ray.remote(_held).options(num_cpus=decode_cpus)
    batches_ref = ray.put(batches)
    ray.get(actor.bare.remote(batches_ref))  # warm-up: the model, the allocator
    chunk = QueryChunk(0, "images", tuple(str(q) for q in queries), tuple(q.name for q in queries))
    pieces = plan_pieces([chunk], 1, concurrency, batch)[0]
    limits = DecodeLimits()

    def index_path() -> int:
        calls = [
            actor.embed_shard.remote(str(work / "warm-index"), i, url, batch, limits)
            for i, url in enumerate(shards)
        ]
        return sum(stats["count"] for stats in ray.get(calls))

    def scan_path() -> int:
        calls = [
            actor.embed_images.remote(p.queries.urls, p.queries.keys, batch, limits, draft=True)
            for p in pieces
        ]
        return sum(len(r.records) for r in ray.get(calls))

    out: dict[str, Any] = {}
    for name, path in (("index", index_path), ("scan", scan_path)):
        path()  # warm-up: decode workers started, files in the page cache
        passes = []
        for _ in range(repeats):
            before = ray.get(actor.bare.remote(batches_ref))
            ray.get([held.remote(0.3) for _ in range(concurrency)])  # on that many workers at once
            t0 = time.perf_counter()
            n = path()
            rate = n / (time.perf_counter() - t0)
            after = ray.get(actor.bare.remote(batches_ref))
            passes.append(
                {
                    "images": n,
                    "path_images_per_s": round(rate, 2),
                    "bare_images_per_s": round((before + after) / 2, 2),
                    "path_over_bare": round(rate / ((before + after) / 2), 3),
                }
            )
        out[name] = {
            "pieces": len(pieces) if name == "scan" else len(shards),
            "passes": passes,
            "path_over_bare_median": float(np.median([p["path_over_bare"] for p in passes])),
        }
    ray.kill(actor)
    return out


def _held(seconds: float) -> int:
    """A task that holds its worker for ``seconds``: several at once need as many workers."""
    time.sleep(seconds)
    return os.getpid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2048, help="training images (repeated past the corpus)")
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--queries", type=int, default=512, help="generations, one scan chunk")
    parser.add_argument(
        "--side", type=int, default=256, help="short side of the training JPEGs (img2dataset)"
    )
    parser.add_argument("--query-side", type=int, default=512, help="short side of the generations")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="every timing is the best of this many")
    parser.add_argument(
        "--warm-repeats", type=int, default=3, help="passes of each path on the warm actor (the median)"
    )
    parser.add_argument("--embedder", default="effnet-lite0")
    parser.add_argument("--work", help="kept data and outputs (default: a temporary folder)")
    parser.add_argument("--skip-scan", action="store_true", help="the index path only")
    parser.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an index config override (repeatable)",
    )
    parser.add_argument(
        "--scan", action="append", default=[], metavar="KEY=VALUE", help="a scan config override (repeatable)"
    )
    args = parser.parse_args(argv)

    from copyscan.indexing.models.embedders import load_embedder
    from copyscan.indexing.runtime.config import parse_overrides
    from copyscan.indexing.runtime.malloc import keep_freed_memory

    keep_freed_memory()  # as the embedding actors do: the bare model at its best
    work = Path(args.work or tempfile.mkdtemp(prefix="copyscan-bench-embed-"))
    data = corpus_shards(work, args.images, args.per_shard, args.side, args.query_side, args.queries)
    embedder = load_embedder(args.embedder, None, "cpu")
    result: dict[str, Any] = {
        "bench": "embed",
        "host": platform.node(),
        "cpus": args.cpus,
        "torch": torch.__version__,
        "embedder": args.embedder,
        "images": args.images,
        "queries": args.queries,
        "side": args.side,
        "query_side": args.query_side,
        "batch": args.batch,
        "index_overrides": args.index,
        "scan_overrides": args.scan,
    }
    torch.set_num_threads(1)
    result["profile_one_core"] = profile(embedder, data["shards"], work)
    torch.set_num_threads(args.cpus)
    index_batches = _decoded(embedder, data["shards"][: max(1, 512 // args.per_shard)])  # rate: 512 do
    result["index"] = {"bare_before": bare(embedder, index_batches, args.repeats, args.cpus)}

    import ray

    from copyscan.jobs._runtime import init_ray

    init_ray(None, num_cpus=args.cpus)
    try:
        result["index"]["pipeline"] = pipeline_index(
            data["shards"], work, args.batch, args.repeats, args.cpus, parse_overrides(args.index)
        )
        result["index"]["bare_after"] = bare(embedder, index_batches, args.repeats, args.cpus)
        warm_batches = index_batches[:4]  # the warm actor's bare model: 256 images
        del index_batches
        if not args.skip_scan:
            query_shard = str(work / "queries.tar")
            _folder_as_tar(Path(data["queries"]), query_shard)
            torch.set_num_threads(args.cpus)
            query_batches = _decoded(embedder, [query_shard])
            torch.set_num_threads(1)
            result["profile_one_core"]["query_decode_preprocess_images_per_s"] = _query_decode_rate(
                embedder, query_shard
            )
            torch.set_num_threads(args.cpus)
            result["scan"] = {"bare_before": bare(embedder, query_batches, args.repeats, args.cpus)}
            result["scan"]["pipeline"] = pipeline_scan(
                str(work / "index-0"),
                data["queries"],
                work,
                args.batch,
                args.repeats,
                args.cpus,
                parse_overrides(args.scan),
            )
            result["scan"]["bare_after"] = bare(embedder, query_batches, args.repeats, args.cpus)
            queries = sorted(Path(data["queries"]).glob("*.jpg"))
            warm = warm_paths(
                args.embedder, data["shards"], queries, warm_batches, work, args.batch, args.warm_repeats
            )
            result["index"]["warm"], result["scan"]["warm"] = warm["index"], warm["scan"]
    finally:
        ray.shutdown()
    for side in ("index", "scan"):
        if side in result:
            # this VM's speed drifts over minutes: the bare model is timed before and after the job, and the
            # job compared with the mean of the two
            rates = [result[side][f"bare_{when}"]["images_per_s"] for when in ("before", "after")]
            bare_rate = result[side]["bare_images_per_s"] = round(sum(rates) / 2, 2)
            keys = [("job_over_bare", "images_per_s")]
            if side == "index":
                keys.append(("steady_over_bare", "steady_images_per_s"))
            for name, key in keys:
                result[side][name] = round(result[side]["pipeline"][key] / bare_rate, 3)
            decode = result["profile_one_core"][
                "decode_preprocess_images_per_s"
                if side == "index"
                else "query_decode_preprocess_images_per_s"
            ]
            result[side]["bound_over_bare"] = round(1.0 / (1.0 + bare_rate / (args.cpus * decode)), 3)
    print(json.dumps(result, indent=2))
    return 0


def _query_decode_rate(embedder: Any, query_shard: str) -> float:
    """Images/s on this thread decoding and preprocessing the generations as the scan does (JPEGs decoded
    reduced where the model's input allows: ``jpeg_draft``, the scan's default)."""
    from copyscan.indexing.embed.decode import DecodeLimits, decode_samples
    from copyscan.indexing.read.reader import iter_tar

    def run() -> int:
        samples = iter_tar(query_shard)
        batches = decode_samples(
            samples, embedder.preprocess, 64, DecodeLimits(), embedder.image_size, draft=embedder.image_size
        )
        return sum(len(b.pixels) for b in batches)

    n = run()
    return round(n / min(_timed(run) for _ in range(2)), 1)


def _folder_as_tar(folder: Path, url: str) -> None:
    """The query JPEGs as one tar, for decoding them the way the bare figure needs (same pixels)."""
    with tarfile.open(url, "w") as tar:
        for path in sorted(folder.glob("*.jpg")):
            _add(tar, path.name, path.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
