"""Speed of pixel verification and of the memorised-prompt clique search on CPU: JSON on stdout.

- ``verify``: aligned 512 × 512 pairs per second for ℓ2 + tiled ℓ2 alone (``pixel_distances``), then with
  decoding included (a 512 px JPEG generation and a training JPEG of 640 × 480, or of 1600 × 1200,
  decoded, aligned and compared, decoding in 1 and in ``threads`` threads: wall pairs/s and pairs per
  CPU-second, the per-core rate), then ``verify_matches`` end to end on a local tar (fetch included).
  Every pair is a distinct pair of images (no decode is shared).
- ``machine.load_average``: the 1-minute load before the run; near 0 means the machine was quiet.
- ``clique``: one prompt of 500 generations (512 px JPEGs of real images and variants, 12 of them
  near-copies of one image): decode to 128 px, all-pairs tiled distances, graph and largest clique.

``python -m bench.pixel [--pairs 256] [--threads 2]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from copyscan.indexing.read.images import open_rgb
from copyscan.jobs.demo.sample_images import DEMO_PACKAGES, real_image_files
from copyscan.search.memorized.clique import max_clique, threshold_graph
from copyscan.search.results.matches import MATCHES_SCHEMA
from copyscan.search.verify.matches import VerifySpec, verify_matches
from copyscan.search.verify.pixel import align, decode_pixels, pairwise_tiled, pixel_distances


def _jpeg(img: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _variants(images: list[Image.Image], count: int) -> list[Image.Image]:
    """``count`` distinct images: the originals, then mirrored, rotated and cropped versions."""
    out = list(images)
    ops = [
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.ROTATE_90),
        lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        lambda im: im.crop((0, 0, im.width // 2, im.height // 2)),
        lambda im: im.crop((im.width // 2, im.height // 2, im.width, im.height)),
        lambda im: im.transpose(Image.Transpose.ROTATE_270),
    ]
    for op in ops:
        out += [op(im) for im in images]
    return out[:count]


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")


def _decode_included(train_bytes: list[bytes], gen_bytes: list[bytes], threads: int) -> dict:
    """Decode + align both sides of every pair in ``threads`` threads, then distances: wall pairs/s, and
    pairs per CPU-second of this process (per-core rate, which other load on the machine barely moves)."""

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        return decode_pixels(train_bytes[i]), decode_pixels(gen_bytes[i])

    n = len(train_bytes)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(min(n, 8))))  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        decoded = list(pool.map(one, range(n)))
        pixel_distances(np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded]))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "pairs_per_s": _rate(n, wall),
        "pairs_per_cpu_s": _rate(n, cpu),
        "cpu_utilisation": round(cpu / wall, 2),
    }


def bench_verify(images: list[Image.Image], pairs: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    # every pair distinct: a training JPEG of 640 x 480 and a noisy 512 px JPEG copy of it as generation
    train = [im.convert("RGB").resize((640, 480)) for im in _variants(images, pairs)]
    train_bytes = [_jpeg(im) for im in train]
    gens = [
        np.clip(align(im, 512).astype(np.int16) + rng.integers(-10, 11, (512, 512, 3)), 0, 255).astype(
            np.uint8
        )
        for im in train
    ]
    gen_bytes = [_jpeg(g) for g in gens]
    a = np.stack([align(im, 512) for im in train])
    b = np.stack(gens)
    pixel_distances(a[:8], b[:8])  # warm-up
    t = time.perf_counter()
    pixel_distances(a, b)
    dist_s = time.perf_counter() - t
    del a, b

    decode = {f"threads_{n}": _decode_included(train_bytes, gen_bytes, n) for n in sorted({1, threads})}
    large = [_jpeg(im.resize((1600, 1200))) for im in train]
    decode_large = {f"threads_{n}": _decode_included(large, gen_bytes, n) for n in sorted({1, threads})}

    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "00000.tar")
        with tarfile.open(shard, "w") as tar:
            for i, data in enumerate(train_bytes):
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        rows = []
        for i in range(pairs):
            path = os.path.join(tmp, f"gen_{i:05d}.jpg")
            with open(path, "wb") as f:
                f.write(gen_bytes[i])
            rows.append(
                {f.name: None for f in MATCHES_SCHEMA}
                | {
                    "query_id": f"gen_{i:05d}.jpg",
                    "query_source": path,
                    "rank": 0,
                    "train_key": f"{i:09d}",
                    "embedding_shard": 0,
                }
            )
        table = pa.Table.from_pylist(rows, MATCHES_SCHEMA)
        t = time.perf_counter()
        _, stats = verify_matches(
            table, {"embedding_shards": [{"source": shard}]}, "bench", VerifySpec(threads=threads)
        )
        e2e_s = time.perf_counter() - t
    return {
        "pairs": pairs,
        "size": 512,
        "distances_only_pairs_per_s": _rate(pairs, dist_s),
        "decode_included_pairs_per_s": decode[f"threads_{threads}"]["pairs_per_s"],
        "decode_included": decode,
        "decode_included_train_1600x1200": decode_large,
        "verify_matches_end_to_end_pairs_per_s": _rate(pairs, e2e_s),
        "verify_matches_seconds": stats["verify_seconds"],
        "verified": stats["verified"],
    }


def bench_clique(images: list[Image.Image], threads: int, n: int = 500, planted: int = 12) -> dict:
    rng = np.random.default_rng(1)
    varied = _variants(images[1:], n - planted)  # images[0] is the one copied
    base = align(images[0], 512).astype(np.float32)
    copies = [
        np.clip(base * rng.uniform(0.97, 1.03) + rng.normal(0, 5, base.shape), 0, 255) for _ in range(planted)
    ]
    encoded = [_jpeg(align(im, 512)) for im in varied] + [_jpeg(c.astype(np.uint8)) for c in copies]
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        x = np.stack(list(pool.map(lambda d: decode_pixels(d, 128), encoded)))
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    D = pairwise_tiled(x)
    pairwise_s = time.perf_counter() - t
    t = time.perf_counter()
    clique = max_clique(threshold_graph(D, 0.08))
    clique_s = time.perf_counter() - t
    return {
        "generations": n,
        "graph_size": 128,
        "decode_seconds": round(decode_s, 3),
        "pairwise_seconds": round(pairwise_s, 3),
        "clique_seconds": round(clique_s, 4),
        "total_seconds": round(decode_s + pairwise_s + clique_s, 3),
        "clique_size": len(clique.members),
        "clique_is_the_planted_one": set(clique.members) == set(range(n - planted, n)),
        "clique_exact": clique.exact,
        "clique_steps": clique.steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    images = [open_rgb(p) for p in real_image_files(80, packages=DEMO_PACKAGES)]
    print(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "load_average": round(os.getloadavg()[0], 2),
                },
                "threads": args.threads,
                "verify": bench_verify(images, args.pairs, args.threads),
                "clique": bench_clique(images, args.threads),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
