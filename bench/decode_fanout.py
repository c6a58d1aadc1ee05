"""How many decode streams keep a model busy: the model fed by N decode processes, for each N. Prints JSON.

The embedding actors' rule (``copyscan.indexing.embed.fanout``) keeps ceil(1.25 × a decode task's seconds an
image / the model's seconds an image) shards in flight per actor, each with a decode task of its own. This
bench checks the rule where Ray is not installed (the GPU machine): N worker processes each run the decode
task's own code over real webdataset shards (``iter_tar`` → ``decode_samples`` → ``timed_batches``, round
robin over the shards) into slots of memory-mapped files, as a Ray streaming generator hands batches to an
actor through the object store (no copy; files rather than /dev/shm, which containers keep small), and this
process runs the model on each batch as it arrives, timed by
the actors' ``ModelClock``. For each N: images/s after a warm-up, the model's busy share, both costs an
image, and the streams the rule asks for from them: the rate should stop growing near that N.

    python -m bench.decode_fanout --device cuda --streams 1 2 4 8 12 15 --shards demo-output/shards \\
        --weights /path/effnet_lite0.pth --batch 256
    python -m bench.decode_fanout --device cpu --streams 1 2 --shards demo-output/shards --batch 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import tempfile
import time

import numpy as np

SLOTS = 4  # batches a worker may run ahead of the model (the actors' PREFETCH_BATCHES)


def _slots(path: str, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """A stream's ``SLOTS`` batches of ``shape`` uint8, memory-mapped from the file ``path``."""
    return np.memmap(path, np.uint8, mode, shape=(SLOTS, *shape))


def _worker(k: int, shards: list[str], spec: dict, shape: tuple, path: str, free, ready, stop) -> None:
    """Decode stream ``k``: shards from the k-th on, round and round, each batch into a free slot of its own
    (the file ``path``), announced on ``ready`` as (stream, slot, images, decode seconds)."""
    from copyscan.indexing.embed.decode import DecodeLimits, decode_samples, timed_batches
    from copyscan.indexing.models.preprocess import make_preprocess
    from copyscan.indexing.read.reader import iter_tar

    slots = _slots(path, shape, "r+")
    preprocess, size, batch = make_preprocess(spec), int(spec["size"]), shape[0]
    i = k
    while not stop.is_set():
        samples = iter_tar(shards[i % len(shards)])
        for decoded in timed_batches(decode_samples(samples, preprocess, batch, DecodeLimits(), size)):
            n = len(decoded.pixels)
            if n == 0:
                continue
            slot = free.get()
            if slot is None:
                return
            slots[slot, :n] = decoded.pixels
            ready.put((k, slot, n, decoded.decode_seconds))
            if stop.is_set():
                return
        i += 1


def run_streams(embedder, shards: list[str], streams: int, batch: int, seconds: float, warmup: float) -> dict:
    """The model fed by ``streams`` decode processes for ``warmup`` + ``seconds``: what it measured."""
    from copyscan.indexing.embed.fanout import ModelClock, streams_needed

    spec = embedder.spec["preprocess"]
    shape = (batch, 3, int(spec["size"]), int(spec["size"]))
    ctx = mp.get_context("spawn")  # no fork of a process that holds a CUDA context
    stop, ready = ctx.Event(), ctx.Queue()
    scratch = tempfile.TemporaryDirectory(prefix="copyscan-fanout-")
    memory, frees, workers = [], [], []
    for k in range(streams):
        path = os.path.join(scratch.name, f"stream{k}")
        memory.append(_slots(path, shape, "w+"))
        free = ctx.Queue()
        for slot in range(SLOTS):
            free.put(slot)
        frees.append(free)
        workers.append(
            ctx.Process(target=_worker, args=(k, shards, spec, shape, path, free, ready, stop), daemon=True)
        )
    for w in workers:
        w.start()
    clock = ModelClock(embedder)
    images, decode_seconds = 0, 0.0
    t_start = time.perf_counter()
    t0 = busy0 = None
    try:
        while True:
            now = time.perf_counter()
            if t0 is None and now - t_start >= warmup:
                t0, busy0 = now, clock.busy_seconds()
            if t0 is not None and now - t0 >= seconds:
                break
            try:
                k, slot, n, spent = ready.get(timeout=60)
            except queue.Empty:
                raise SystemExit(f"no decoded batch in 60 s with {streams} stream(s)") from None
            clock.embed(np.asarray(memory[k][slot, :n]))  # host arrays back: synchronised, as in the actors
            frees[k].put(slot)
            if t0 is not None:
                images += n
                decode_seconds += spent
        wall = time.perf_counter() - t0
        busy = clock.busy_seconds() - busy0
    finally:
        stop.set()
        for free in frees:
            free.put(None)
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
        del memory
        scratch.cleanup()
    decode_per_image = decode_seconds / max(1, images)
    model_per_image = busy / max(1, images)
    return {
        "streams": streams,
        "images": images,
        "seconds": round(wall, 2),
        "images_per_s": round(images / wall, 1),
        "model_busy_share": round(busy / wall, 3),
        "decode_ms_per_image_per_stream": round(1e3 * decode_per_image, 3),
        "model_ms_per_image": round(1e3 * model_per_image, 4),
        "streams_the_rule_keeps": streams_needed(decode_per_image, model_per_image),
    }


def _shard_list(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
        else:
            out.append(path)
    if not out:
        raise SystemExit(f"no .tar shards in {paths}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shards", nargs="+", required=True, help="webdataset tars, or folders of them")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per stream count")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before timing (workers start)")
    parser.add_argument("--embedder", default="effnet-lite0")
    parser.add_argument("--weights", default=None, help="weights file (the packaged ones by default)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of the model; 0 = torch's")
    args = parser.parse_args(argv)

    import torch

    from copyscan.indexing.models.embedders import load_embedder
    from copyscan.indexing.runtime.malloc import keep_freed_memory

    keep_freed_memory()  # as an embedding actor does: a batch's activations reused, not mapped afresh
    if args.threads:
        torch.set_num_threads(args.threads)
    embedder = load_embedder(args.embedder, args.weights, args.device)
    shards = _shard_list(args.shards)
    runs = [run_streams(embedder, shards, n, args.batch, args.seconds, args.warmup) for n in args.streams]
    print(
        json.dumps(
            {
                "bench": "decode_fanout",
                "host": platform.node(),
                "torch": torch.__version__,
                "device": str(embedder.device),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "cpus": len(os.sched_getaffinity(0)),
                "model_threads": torch.get_num_threads(),
                "embedder": args.embedder,
                "batch": args.batch,
                "shards": len(shards),
                "runs": runs,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
