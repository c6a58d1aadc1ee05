"""Throughput of the embedding stage: model images/s per device and CPU decode images/s per core. Prints JSON.

Model: ``Embedder.embed`` exactly as the embedding actors call it (uint8 batch on the host → device → descriptor
→ host float32), on random uint8 batches, after warm-up, for each ``--batch``; embedders given by name with
their weights (``--weights name=path``; effnet-lite0 uses its packaged weights, or ``--weights`` when the
package is not installed, e.g. on a GPU box). DINO takes a weights file: ``--dino-random`` writes a randomly
initialised ViT-B/16 state dict first (throughput does not depend on the values).

Decode (``--decode SHARD_URL``): ``decode_samples`` over a real webdataset shard on one core (JPEG decode,
resize to the embedder's input), the CPU work that feeds each GPU.

    python -m bench.embed_throughput --device cuda --batch 64 256 --embedders effnet-lite0 dino-vitb16 --dino-random
    python -m bench.embed_throughput --device cpu --batch 32 --decode demo-output/shards/00000.tar
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch


def _time_embed(embedder, batch: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    size = embedder.image_size
    pixels = rng.integers(0, 256, size=(batch, 3, size, size), dtype=np.uint8)
    for _ in range(3):  # warm-up: kernels, cudnn autotune, allocator
        embedder.embed(pixels)
    if embedder.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        embedder.embed(pixels)  # returns host arrays: synchronises
        n += batch
    elapsed = time.perf_counter() - t0
    return {"batch": batch, "images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 1)}


def _decode_rate(url: str, embedder) -> dict:
    from copyscan.indexing.embed.decode import decode_samples
    from copyscan.indexing.read.reader import iter_tar

    t0 = time.perf_counter()
    n = rejected = 0
    for batch in decode_samples(iter_tar(url), embedder.preprocess, 64, image_size=embedder.image_size):
        n += len(batch.pixels)
        rejected += len(batch.rejections)
    elapsed = time.perf_counter() - t0
    return {"shard": url, "images": n, "rejected": rejected, "images_per_s_per_core": round(n / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per configuration")
    parser.add_argument("--embedders", nargs="+", default=["effnet-lite0"])
    parser.add_argument("--weights", nargs="*", default=[], help="name=path, e.g. effnet-lite0=/w/effnet.pth")
    parser.add_argument(
        "--dino-random", action="store_true", help="write random ViT-B/16 weights for dino-vitb16"
    )
    parser.add_argument("--decode", help="a webdataset shard to measure CPU decode on (one core)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (decode and CPU embedding)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from copyscan.indexing.models.embedders import load_embedder

    weights = dict(item.split("=", 1) for item in args.weights)
    scratch = tempfile.mkdtemp(prefix="copyscan-bench-")
    if args.dino_random and "dino-vitb16" in args.embedders and "dino-vitb16" not in weights:
        from copyscan.indexing.models.vit import vit_base_patch16

        torch.manual_seed(0)
        weights["dino-vitb16"] = os.path.join(scratch, "dino_random.pth")
        torch.save(vit_base_patch16().state_dict(), weights["dino-vitb16"])

    result: dict = {
        "bench": "embed_throughput",
        "host": platform.node(),
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": args.threads,
        "embedders": {},
    }
    for name in args.embedders:
        embedder = load_embedder(name, weights.get(name), args.device)
        rows = [_time_embed(embedder, b, args.seconds) for b in args.batch]
        entry = {
            "dim": embedder.dim,
            "input": embedder.image_size,
            "device": str(embedder.device),
            "runs": rows,
        }
        if args.decode:
            entry["decode"] = _decode_rate(args.decode, embedder)
        result["embedders"][name] = entry
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
