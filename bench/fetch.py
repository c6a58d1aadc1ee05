"""Training images fetched back by key from object storage: streaming the tar against one ranged read each.

A LAION shard of ``--images`` (10,000) img2dataset-layout samples (``--side`` px JPEGs of real images, the
tests' corpus, repeated under new keys) is uploaded to a loopback S3 server (moto, as the tests start it);
``--matches`` (10) keys spread over the shard are fetched with ``copyscan.indexing.read.fetch.fetch_images``
as verification and the report's gallery call it: without their places (the tar streamed up to the last
wanted key, what an index built before offsets gets) and with the places the embedding metadata records
(``tar_offset`` / ``tar_size``, one ranged GET each). Both answers are checked equal. Prints JSON.

    python -m bench.fetch --images 10000 --matches 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np


def _shard(path: str, n: int, side: int) -> tuple[list[str], dict[str, tuple[int, int]], int]:
    """Write the shard; return its keys, {key: (offset, size)} of its images (as the reader records them)
    and the bytes of its images."""
    from PIL import Image

    from copyscan.indexing.read.images import open_rgb
    from copyscan.indexing.read.reader import iter_tar
    from copyscan.jobs.demo.sample_images import real_image_files

    bases = []
    for p in real_image_files(64):
        img = open_rgb(p)
        scale = side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        bases.append(buf.getvalue())
    keys = [f"{i:09d}" for i in range(n)]
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in (
                ("jpg", bases[i % len(bases)]),
                ("txt", f"caption {i}".encode()),
                ("json", json.dumps({"key": key, "url": f"http://example.com/{key}.jpg"}).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    where = {s.key: (s.image_offset, len(s.image)) for s in iter_tar(path)}
    return keys, where, sum(size for _, size in where.values())


def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    best, result = None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--matches", type=int, default=10)
    parser.add_argument("--side", type=int, default=256, help="short side of the shard's JPEGs")
    parser.add_argument("--repeats", type=int, default=3, help="every timing is the best of this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    from copyscan.indexing.read import fetch
    from copyscan.indexing.store import storage

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
        with tempfile.TemporaryDirectory(prefix="copyscan-bench-fetch-") as tmp:
            local = os.path.join(tmp, "00000.tar")
            keys, where, image_bytes = _shard(local, args.images, args.side)
            fs, _ = storage.get_fs("s3://bench", so)
            fs.mkdir("bench")
            fs.put_file(local, "bench/shards/00000.tar")
            tar_bytes = os.path.getsize(local)
        url = "s3://bench/shards/00000.tar"
        rng = np.random.default_rng(args.seed)
        wanted = sorted(rng.choice(len(keys), args.matches, replace=False).tolist())
        requests = [(url, keys[i]) for i in wanted]
        ranges = {(url, keys[i]): where[keys[i]] for i in wanted}
        streamed_s, streamed = _time(lambda: fetch.fetch_images(requests, so), args.repeats)
        ranged_s, ranged = _time(lambda: fetch.fetch_images(requests, so, ranges=ranges), args.repeats)
        assert all(streamed[r].data is not None and streamed[r].data == ranged[r].data for r in requests)
        read_streamed = max(where[keys[i]][0] + where[keys[i]][1] for i in wanted)  # up to the last key
        read_ranged = sum(where[keys[i]][1] + 512 for i in wanted)
        result = {
            "bench": "fetch",
            "store": "moto S3 on loopback",
            "images_in_shard": args.images,
            "tar_bytes": tar_bytes,
            "image_bytes": image_bytes,
            "matches": args.matches,
            "streamed": {
                "seconds": round(streamed_s, 4),
                "fetches_per_s": round(args.matches / streamed_s, 2),
                "bytes_read_at_least": read_streamed,
            },
            "ranged": {
                "seconds": round(ranged_s, 4),
                "fetches_per_s": round(args.matches / ranged_s, 2),
                "bytes_read": read_ranged,
            },
            "speedup": round(streamed_s / ranged_s, 1),
        }
    finally:
        server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
