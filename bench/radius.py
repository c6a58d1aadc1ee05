"""Every match above a score_norm threshold (scan option radius), against exact search. Prints JSON.

Builds (or reuses) the index bench's collection and index (``bench/index.py``: a local KDE of real
descriptors in near-duplicate groups, copyscan's default learned whitening, ``--factory``), then, on the same
queries, for each ``--radius`` and ``--margin``:

- truth: every stored vector whose exact score_norm (score in the index's space minus the pair's background
  bias, ``copyscan.search.ann.normalise``) reaches the radius, from brute force over all stored vectors;
- copyscan: ``ShardSearcher.search`` with ``Above`` (the folded range search, exact re-ranking), score
  normalisation and ``keep_above``, as the scan's driver runs them; its top K and extra matches together.
  The floor (one search of the background sample per query) is computed once, outside the timings.

Reported: recall of the truth's pairs (all pairs, and pairs past each query's top K), precision (1 by
construction: every kept pair is exactly scored), queries with matches past the top K, and the time of the
search against the same top-K search (and its normalisation) without radius, and against brute force over
the same queries (a matrix product and the floor test; the normaliser's scoring of its pairs not timed).

    python -m bench.radius --n 200000 --base /tmp/bench_cd/index --work /tmp/br --radius 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import faiss
import numpy as np

from bench.index import build, write_collection
from copyscan.indexing.build.postprocess import apply_whitening
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.store import layout, storage
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.radius import Above, keep_above, radius_counts
from copyscan.search.ann.searcher import ShardSearcher

K = 10


def truth_pairs(
    stored_w: np.ndarray,
    offsets: np.ndarray,
    xw: np.ndarray,
    lo: np.ndarray,
    normalise: ScoreNormaliser,
    xq: np.ndarray,
    radius: float,
) -> tuple[set[tuple[int, int]], float]:
    """Every (query, row) with exact score_norm >= radius: brute force over ``stored_w`` (the stored vectors
    in the index's space, embedding shard after shard: shard s starts at row ``offsets[s]``), pairs below the
    query's floor ``lo`` skipped (they cannot pass), the rest scored by the normaliser. Returns the pairs and
    the brute-force seconds."""
    t0 = time.perf_counter()
    found = []
    for q0 in range(0, len(xw), 100):
        S = xw[q0 : q0 + 100] @ stored_w.T
        q, r = np.nonzero(S >= lo[q0 : q0 + 100, None])
        found.append((q + q0, r, S[q, r]))
    seconds = time.perf_counter() - t0
    q, r, s = (np.concatenate(parts) for parts in zip(*found, strict=True))
    pairs = set()
    for query in np.unique(q):
        rows = r[q == query]
        shard = np.searchsorted(offsets, rows, side="right") - 1
        ids = (shard.astype(np.int64) << layout.ROW_BITS) | (rows - offsets[shard])
        norm = normalise(xq[query : query + 1], s[q == query][None, :], ids[None, :])[0]
        pairs.update((int(query), int(row)) for row in rows[norm >= radius])
    return pairs, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--base", required=True, help="a copyscan index of real images (with pairs)")
    parser.add_argument("--dup-group-mean", type=float, default=1.4)
    parser.add_argument("--dup-spread", type=float, default=0.25)
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--whitening", choices=("none", "pca", "learned"), default="learned")
    parser.add_argument("--pair-images", type=int, default=IndexConfig.whitening_pair_images)
    parser.add_argument("--pair-copies", type=int, default=IndexConfig.whitening_pair_copies)
    parser.add_argument("--shard-vectors", type=int, default=1_000_000)
    parser.add_argument("--max-code-bytes", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--radius", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--margin", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--extra", type=int, default=1000, help="radius_max")
    parser.add_argument("--work", required=True, help="work folder (shared with bench.index runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--machine", default="shared 2-core CPU VM")
    args = parser.parse_args(argv)
    args.whitening_shrinkage = None
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    out = os.path.join(args.work, "index" if args.whitening == "none" else f"index-{args.whitening}")
    counts, xq, is_copy = write_collection(args, out)
    manifest, build_seconds = build(out, args.factory, counts, int(xq.shape[1]), args)
    searcher = ShardSearcher(
        out, manifest, [e["index_shard"] for e in manifest["index_shards"]], os.path.join(args.work, "cache")
    )
    normalise = ScoreNormaliser(out, manifest)
    offsets = np.cumsum([0] + [counts[s] for s in sorted(counts)])
    stored = np.concatenate([np.load(layout.emb_url(out, s)) for s in sorted(counts)]).astype(np.float32)
    params = searcher.whitening
    stored_w = apply_whitening(params, stored) if params is not None else stored
    del stored
    xw = apply_whitening(params, xq) if params is not None else xq
    floor = normalise.floor(xq)

    searcher.search(xq[:50], K, args.candidates, args.nprobe)  # warm
    t0 = time.perf_counter()  # what a scan does without radius: top K, then score normalisation
    plain = searcher.search(xq, K, args.candidates, args.nprobe)
    normalise(xq, plain.D, plain.I)
    topk_seconds = time.perf_counter() - t0

    result: dict[str, Any] = {
        "bench": "radius",
        "n": manifest["ntotal"],
        "queries": len(xq),
        "copy_queries": int(is_copy.sum()),
        "factory": manifest["index"]["factory"],
        "whitening": args.whitening,
        "nprobe": args.nprobe,
        "candidates": args.candidates,
        "k": K,
        "extra": args.extra,
        "build_seconds": build_seconds,
        "floor": {"mean": round(float(np.nanmean(floor)), 4), "min": round(float(np.nanmin(floor)), 4)},
        "topk_seconds": round(topk_seconds, 3),
        "cpu_threads": faiss.omp_get_max_threads(),
        "machine": args.machine,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "runs": [],
    }
    for radius in args.radius:
        lo = (radius + floor).astype(np.float32)
        truth, flat_seconds = truth_pairs(stored_w, offsets, xw, lo, normalise, xq, radius)
        for margin in args.margin:
            above = Above(lo, args.extra, margin)
            t0 = time.perf_counter()
            hits = searcher.search(xq, K, args.candidates, args.nprobe, above)
            hits.D_norm = normalise(xq, hits.D, hits.I)
            hits = keep_above(hits, K, radius)
            seconds = time.perf_counter() - t0
            shard, row = layout.unpack_ids(hits.I)
            rows = np.where(hits.I >= 0, offsets[np.maximum(shard, 0)] + row, -1)
            passing = (hits.D_norm >= radius) & (hits.I >= 0)
            got = {(int(q), int(rows[q, j])) for q, j in zip(*np.nonzero(passing), strict=True)}
            top = {(int(q), int(rows[q, j])) for q, j in zip(*np.nonzero(passing[:, :K]), strict=True)}
            beyond = truth - top
            run = {
                "radius": radius,
                "margin": margin,
                "truth_pairs": len(truth),
                "truth_queries": len({q for q, _ in truth}),
                "truth_pairs_past_top_k": len(beyond),
                "recall": round(len(got & truth) / max(len(truth), 1), 4),
                "recall_past_top_k": round(len((got - top) & beyond) / max(len(beyond), 1), 4),
                "precision": round(len(got & truth) / max(len(got), 1), 4),
                **radius_counts(hits, K, above),
                "seconds": round(seconds, 3),
                "seconds_vs_topk": round(seconds / topk_seconds, 2),
                "flat_seconds": round(flat_seconds, 3),
                "speedup_vs_flat": round(flat_seconds / seconds, 1),
            }
            result["runs"].append(run)
            print(json.dumps(run), file=sys.stderr)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    storage.write_json(os.path.join(args.work, "radius_last.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
