"""The embedding pipeline against the bare model, on the same images and the same cores. Prints JSON.

Three figures, for the index path (img2dataset shards) and the scan's query path (a folder of generations):

- ``bare``: ``Embedder.embed`` alone on pre-decoded uint8 batches, ``torch`` on ``--cpus`` threads, in this
  process: what the model costs when nothing else runs;
- ``pipeline``: the job itself on a local Ray of ``--cpus`` CPUs with its default settings (tar read via
  fsspec → decode tasks → embedding actors → per-shard outputs and markers): the index job's ``embed``
  phase from its manifest's timings, the scan's whole run from its summary (against a flat index, whose
  search is negligible);
- ``profile``: where the rest of the time goes, each step alone on one core: tar read (fsspec + webdataset),
  decode + preprocess into model input (``decode_samples``), and writing a shard's outputs.

``pipeline / bare`` is the figure the throughput issue targets (≥ 0.9). The data: ``--images`` real images
(the tests' corpus of Debian packages) written as img2dataset-layout shards of ``--per-shard`` JPEGs with
their short side at ``--side`` px (img2dataset's default 256; LAION sets often use 384), and as generations
(``--query-side`` px JPEGs, the size of a diffusion model's output).

    python -m bench.embed --images 512 --cpus 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


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


def write_data(images: list[Path], work: Path, per_shard: int, side: int, query_side: int) -> dict[str, Any]:
    """img2dataset-layout shards (``{key}.jpg/.txt/.json``) and a folder of query JPEGs of the same images."""
    shards_dir, queries = work / "shards", work / "queries"
    shards_dir.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
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
    for i, path in enumerate(images):
        (queries / f"gen_{i:05d}.jpg").write_bytes(_jpeg(path, query_side))
    return {"shards": urls, "queries": str(queries)}


def _decoded(embedder: Any, shards: list[str]) -> list[np.ndarray]:
    from copyscan.indexing.embed.decode import decode_samples
    from copyscan.indexing.read.reader import iter_tar

    out = []
    for url in shards:
        for batch in decode_samples(iter_tar(url), embedder.preprocess, 64, image_size=embedder.image_size):
            out.append(batch.pixels)
    return out


def bare(embedder: Any, batches: list[np.ndarray], repeats: int) -> dict[str, Any]:
    """Best of ``repeats`` passes of the model over ``batches`` (after one warm-up batch)."""
    embedder.embed(batches[0])
    n = sum(len(b) for b in batches)
    best = min(_timed(lambda: [embedder.embed(b) for b in batches]) for _ in range(repeats))
    return {"images": n, "seconds": round(best, 3), "images_per_s": round(n / best, 2)}


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


def pipeline_index(shards: list[str], work: Path, batch: int, repeats: int) -> dict[str, Any]:
    """The index job's embed phase (manifest timings), best of ``repeats`` fresh runs, flat index."""
    import copyscan

    best = None
    for r in range(repeats):
        manifest = copyscan.index(
            str(Path(shards[0]).parent / "*.tar"),
            str(work / f"index-{r}"),
            whitening="none",
            index_factory="Flat",
            batch_size=batch,
            mode="overwrite",
        )
        seconds = float(manifest["timings"]["embed"])
        best = seconds if best is None else min(best, seconds)
    n = int(manifest["ntotal"])
    return {"images": n, "seconds": round(best, 3), "images_per_s": round(n / best, 2) if n else None}


def pipeline_scan(index: str, queries: str, work: Path, batch: int, repeats: int) -> dict[str, Any]:
    """The scan job's whole run (summary seconds), best of ``repeats`` fresh runs, against a flat index."""
    import copyscan

    best, n = None, None
    for r in range(repeats):
        summary = copyscan.scan(index, queries, str(work / f"scan-{r}"), batch_size=batch, mode="overwrite")
        seconds = float(summary["this_run"]["seconds"])
        n = int(summary["embedded"])
        best = seconds if best is None else min(best, seconds)
    return {"images": n, "seconds": round(best, 3), "images_per_s": round(n / best, 2) if n else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument(
        "--side", type=int, default=256, help="short side of the training JPEGs (img2dataset)"
    )
    parser.add_argument("--query-side", type=int, default=512, help="short side of the generations")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for both sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="every timing is the best of this many")
    parser.add_argument("--embedder", default="effnet-lite0")
    parser.add_argument("--work", help="kept data and outputs (default: a temporary folder)")
    parser.add_argument("--skip-scan", action="store_true", help="the index path only")
    args = parser.parse_args(argv)

    from copyscan.indexing.models.embedders import load_embedder
    from copyscan.jobs.demo.sample_images import real_image_files

    work = Path(args.work or tempfile.mkdtemp(prefix="copyscan-bench-embed-"))
    data = write_data(real_image_files(args.images), work, args.per_shard, args.side, args.query_side)
    embedder = load_embedder(args.embedder, None, "cpu")
    result: dict[str, Any] = {
        "bench": "embed",
        "host": platform.node(),
        "cpus": args.cpus,
        "torch": torch.__version__,
        "embedder": args.embedder,
        "images": args.images,
        "side": args.side,
        "query_side": args.query_side,
        "batch": args.batch,
    }
    torch.set_num_threads(1)
    result["profile_one_core"] = profile(embedder, data["shards"], work)
    torch.set_num_threads(args.cpus)
    index_batches = _decoded(embedder, data["shards"])
    result["index"] = {"bare": bare(embedder, index_batches, args.repeats)}
    del index_batches

    import ray

    from copyscan.jobs._runtime import init_ray

    init_ray(None, num_cpus=args.cpus)
    try:
        result["index"]["pipeline"] = pipeline_index(data["shards"], work, args.batch, args.repeats)
        if not args.skip_scan:
            query_shard = str(work / "queries.tar")
            _folder_as_tar(Path(data["queries"]), query_shard)
            torch.set_num_threads(args.cpus)
            result["scan"] = {"bare": bare(embedder, _decoded(embedder, [query_shard]), args.repeats)}
            result["scan"]["pipeline"] = pipeline_scan(
                str(work / "index-0"), data["queries"], work, args.batch, args.repeats
            )
    finally:
        ray.shutdown()
    for side in ("index", "scan"):
        if side in result and result[side]["pipeline"]["images_per_s"]:
            result[side]["pipeline_over_bare"] = round(
                result[side]["pipeline"]["images_per_s"] / result[side]["bare"]["images_per_s"], 3
            )
    print(json.dumps(result, indent=2))
    return 0


def _folder_as_tar(folder: Path, url: str) -> None:
    """The query JPEGs as one tar, for decoding them the way the bare figure needs (same pixels)."""
    with tarfile.open(url, "w") as tar:
        for path in sorted(folder.glob("*.jpg")):
            _add(tar, path.name, path.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
