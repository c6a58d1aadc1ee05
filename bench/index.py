"""ANN index at scale on this machine: recall@10 against exact search, speed-up, bytes per vector, build time.

Builds a real copyscan index in-process (embedding shards on disk → ``plan_index`` → ``train_phase`` →
``fill_index_shard`` per index shard → ``ShardSearcher`` with exact re-ranking) over ``--n`` vectors and
compares it, on the same queries in the same run, with exact brute force (faiss ``IndexFlatIP`` over the
same stored float16 vectors). Prints JSON.

Data: copy-detection descriptors are not uniform on the sphere, and a web-scale training set holds many
near-duplicates. With ``--base INDEX_URL`` (a copyscan index built from real images), "images" are drawn
from a Gaussian with the mean and covariance of that index's real descriptors (their spectrum, projected
on the sphere), and each image gets ~``--cluster-size`` variants: noise with the covariance of real
(image, augmented copy) descriptor differences (the index's ``embeddings/pairs``) × ``--spread``. Queries
are fresh variants of indexed images (never indexed themselves), as generations that copy would be. Without ``--base``, the
centres are random directions in a 64-dimensional subspace (a low intrinsic dimension, as real descriptors
have) and the noise is isotropic.

    python -m bench.index --n 1000000 --base ~/.cache/copyscan/bench/.../index-...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import faiss
import numpy as np

from indexing import layout, storage
from indexing.build import fill_index_shard, load_pairs, train_phase
from indexing.embed import EmbeddedSource, finished_shards, write_shard_outputs
from indexing.manifest import build_manifest
from indexing.planner import plan_index
from search.searcher import ShardSearcher

PART = 100_000  # vectors per embedding shard


def _sampler(args, rng):
    """(draw(count) → (count, d) float32 unit vectors, description)."""
    if args.base:
        manifest = storage.read_json(storage.join(args.base, layout.MANIFEST_NAME))
        parts = [
            storage.load_npy(layout.emb_url(args.base, e["shard"])) for e in manifest["embedding_shards"]
        ]
        real = np.concatenate(parts).astype(np.float64)
        # centres: Gaussian with the real descriptors' mean and covariance (their spectrum), on the sphere
        eigval, eigvec = np.linalg.eigh(np.cov(real, rowvar=False))
        colour = (eigvec * np.sqrt(np.clip(eigval, 0, None))).T
        n_centres = max(1, args.n // args.cluster_size)
        centres = (real.mean(0) + rng.standard_normal((n_centres, real.shape[1])) @ colour).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x, x_aug = load_pairs(args.base, [e["shard"] for e in manifest["embedding_shards"]])
        if len(x) < 16:
            raise SystemExit(
                f"{args.base} has no augmented pairs (build it with the default whitening=learned)"
            )
        diff = (x - x_aug).astype(np.float64)
        cov = diff.T @ diff / len(diff)
        eigval, eigvec = np.linalg.eigh(cov)
        transform = (eigvec * np.sqrt(np.clip(eigval, 0, None))).T.astype(
            np.float32
        )  # z @ transform ~ N(0, cov)
        what = (
            f"{n_centres} images drawn from the mean and covariance of {len(real)} real descriptors of {args.base}, "
            f"~{args.cluster_size} variants each (near-duplicates: noise with the covariance of {len(x)} real "
            f"(image, augmented copy) descriptor differences × {args.spread})"
        )
    else:
        d, k = 512, 64
        basis = np.linalg.qr(rng.standard_normal((d, k)))[0].astype(np.float32)
        centres = rng.standard_normal((args.clusters, k)).astype(np.float32) @ basis.T
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        transform = np.eye(d, dtype=np.float32) * 0.02
        what = (
            f"{args.clusters} random centres in a 64-d subspace of R^512, isotropic noise 0.02·{args.spread}"
        )

    def draw(count: int) -> np.ndarray:
        z = rng.standard_normal((count, transform.shape[0])).astype(np.float32)
        v = centres[rng.integers(0, len(centres), count)] + args.spread * (z @ transform)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return draw, what


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--base", help="a copyscan index of real images whose descriptors seed the data")
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around each centre")
    parser.add_argument("--clusters", type=int, default=20_000, help="centres without --base")
    parser.add_argument(
        "--cluster-size", type=int, default=4, help="vectors per image (near-duplicates), --base"
    )
    parser.add_argument("--shard-vectors", type=int, default=500_000, help="vectors per index shard")
    parser.add_argument("--max-code-bytes", type=int, default=64)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--candidates", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--work", help="work folder (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="copyscan-bench-index-")
    out = os.path.join(work, "index")
    shutil.rmtree(out, ignore_errors=True)
    draw, what = _sampler(args, rng)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    for shard, start in enumerate(range(0, args.n, PART)):
        xb = draw(min(PART, args.n - start))
        records = [{"key": f"{shard:05d}{i:06d}"} for i in range(len(xb))]
        write_shard_outputs(out, shard, f"synthetic/{shard:05d}", EmbeddedSource(xb, records, []), "bench")
    xq = draw(args.queries)
    seconds["write_vectors"] = time.perf_counter() - t0
    stats = finished_shards(out)
    counts = {s: st["count"] for s, st in stats.items()}
    dim = int(xq.shape[1])
    plan = plan_index(
        counts,
        dim,
        flat_threshold=0,
        max_shard_vectors=args.shard_vectors,
        max_code_bytes=args.max_code_bytes,
    )

    t0 = time.perf_counter()
    info = train_phase(
        out, plan.factory, counts, train_size=plan.train_size, whitening="none", background_size=1_000
    )
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    markers = {j: fill_index_shard(out, plan.factory, j, g, False) for j, g in enumerate(plan.shard_groups)}
    seconds["fill"] = time.perf_counter() - t0
    manifest = build_manifest(
        cfg={"out": out, "whitening": "none", "whitening_shrinkage": 0.0},
        shards=[st["source"] for _, st in sorted(stats.items())],
        stats=stats,
        spec={"name": "bench", "dim": dim, "preprocess": None},
        plan=plan,
        markers=markers,
        train_info=info,
        timings={},
        started_at=0,
    )
    manifest["build_id"] = "bench"
    index_bytes = sum(m["bytes"] for m in markers.values())

    # exact: brute force over the stored float16 vectors (what the index re-ranks with)
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in sorted(counts)]).astype(np.float32)
    flat = faiss.IndexFlatIP(dim)
    flat.add(stored)
    del stored
    t0 = time.perf_counter()
    _, exact = flat.search(xq, 10)
    flat_seconds = time.perf_counter() - t0
    del flat
    offsets = np.cumsum([0] + [counts[s] for s in sorted(counts)])
    searcher = ShardSearcher(
        out, manifest, [e["index_shard"] for e in manifest["index_shards"]], os.path.join(work, "cache")
    )
    runs = []
    for nprobe in args.nprobe:
        for candidates in args.candidates:
            searcher.search(xq[:50], 10, candidates, nprobe)  # warm: page in the lists and vectors
            t0 = time.perf_counter()
            result = searcher.search(xq, 10, candidates, nprobe)
            ann_seconds = time.perf_counter() - t0
            shard, row = layout.unpack_ids(result.I)
            found = np.where(result.I >= 0, offsets[np.maximum(shard, 0)] + row, -1)
            recall = float(np.mean([len(set(found[i]) & set(exact[i])) / 10 for i in range(len(xq))]))
            runs.append(
                {
                    "nprobe": nprobe,
                    "candidates": candidates,
                    "recall@10": round(recall, 4),
                    "seconds": round(ann_seconds, 3),
                    "queries_per_s": round(len(xq) / ann_seconds, 1),
                    "speedup_vs_flat": round(flat_seconds / ann_seconds, 1),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr)
    result = {
        "bench": "index",
        "n": args.n,
        "dim": dim,
        "queries": len(xq),
        "data": what,
        "factory": plan.factory,
        "index_shards": len(plan.shard_groups),
        "train_vectors": info["train_vectors"],
        "code_bytes_per_vector": plan.code_bytes,
        "index_bytes_per_vector": round(index_bytes / args.n, 1),
        "flat_seconds": round(flat_seconds, 3),
        "flat_queries_per_s": round(len(xq) / flat_seconds, 1),
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cpu_threads": faiss.omp_get_max_threads(),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
