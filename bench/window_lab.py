"""Which query windows a partial-copy scan should embed, and how: the scan's region matching in one process
on cached window vectors. Prints JSON.

``bench.partial_copies`` scans pasted copies through the whole job, one query mode at a time. Here the scan's
own parts (``LocalWindows`` search and ``refine_result``, ``aggregate``, the region index's ``RegionSearcher``,
the global ``ShardSearcher`` and ``ScoreNormaliser``, the index's embedder; the scan's defaults) run in one
process on the generations ``bench.partial_copies`` made (same ``--seed``, ``--copies``, ``--negatives``: run
it first). Every generation's 195 windows are embedded once in every way compared, and cached, so each way of
choosing which windows to crop is scored exactly, in seconds:

- ``crop448``: every window cut from the generation at 448 px and embedded at 224 px (the scan's ``crop``,
  to the copy); ``crop576``: cut from it at 576 px;
- ``pool576``: every window pooled from one 576 px pass (``pool`` at that size);
- ``hybridM``: pooled, then the M windows with the best normalised hit cut from 576 px and embedded
  (``hybrid`` with ``region_recrop=M``, to the copy for M = 8);
- ``vote4+4``: the 4 best windows as in hybrid, plus, for each of the 4 images whose pooled hits add up
  highest over all windows, the window that scored it best;
- ``tiles8``: windows pooled from 3 × 3 tiles of 0.55 of a side at 246 px (less context than the whole
  pass), the 8 best cut again; ``bigger8``: the pooled grid plus pooled windows of 0.5 and 0.4 of a side;
- ``smallS``: every window cut from 576 px and embedded at S px instead of 224 (cheaper passes);
  ``smallS+8``: their 8 best hits' windows embedded again at 224.

Each variant gives, per seed, the copies whose source is the best local match (``local_score_norm``, after
the frames of ``region_refine``), recall@1 and AP as ``bench.partial_copies`` scores them, and the model
work per generation in 224-px passes (pixels, frames and the global pass left out: the same for all).

    python -m bench.partial_copies --train 300 --index-negatives 100 --pair-images 120 --copies 40 \\
        --negatives 20 --index-tag regions=true-whitening_pair_images=120 --seed 3      # makes the queries
    python -m bench.window_lab --train 300 --index-negatives 100 --copies 40 --negatives 20 \\
        --index-tag regions=true-whitening_pair_images=120 --seed 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import domains as bench_domains
from bench.copy_detection import ranking_metrics
from copyscan.indexing.models.embedders import load_embedder
from copyscan.indexing.models.preprocess import make_preprocess
from copyscan.indexing.models.regions import parse_grid
from copyscan.indexing.runtime.config import resolve
from copyscan.indexing.store import layout
from copyscan.indexing.store.manifest import load_manifest
from copyscan.jobs.demo import data as demo_data
from copyscan.search.ann.normalise import ScoreNormaliser
from copyscan.search.ann.searcher import ShardSearcher
from copyscan.search.ann.topk import ShardResult
from copyscan.search.regions.result import aggregate
from copyscan.search.regions.searcher import RegionSearcher
from copyscan.search.regions.windows import best_windows, local_windows, replace_rows
from copyscan.search.scan_config import ScanConfig

BIGGER = "0.5:3,0.4:4"  # pooled windows larger than the grid's (bigger8)
TILE, TILES, TILE_PX = 0.55, 3, 246  # tiles8: side (fraction), per axis, px
POOLED = (576 / 224) ** 2  # the 576 px pass in 224 px passes


class Parts:
    """The scan's region matching for the index at ``index``, in this process."""

    def __init__(self, index: str):
        self.manifest = load_manifest(index)
        # hybrid: the pooled windows' spec (576 px); every crop is cut here
        settings = {
            "index": index,
            "queries": "-",
            "out": "-",
            "regions": "on",
            "region_query_mode": "hybrid",
        }
        cfg = resolve(ScanConfig, settings)
        self.local = local_windows(cfg, self.manifest)
        embedder = self.manifest["embedder"]
        self.embedder = load_embedder(
            embedder["name"], embedder.get("weights"), "cpu", embedder.get("options")
        )
        shards = lambda m: [int(s["index_shard"]) for s in m["index_shards"]]  # noqa: E731
        sub = self.local.manifest
        regions = RegionSearcher(index, sub, shards(sub), "", None, cfg.region_density_beta)
        r_set, g_set = cfg.search_settings(sub), cfg.search_settings(self.manifest)
        glob = ShardSearcher(index, self.manifest, shards(self.manifest), "", None)
        normalise = ScoreNormaliser(index, self.manifest, cfg.beta, None)
        rk, gk = cfg.region_hits, cfg.k
        # the RegionIndex that LocalWindows searches (pair_scores: only the split product needs them)
        self.region_index = SimpleNamespace(
            search=lambda x: regions.search(x, rk, max(r_set["candidates"], rk), r_set["nprobe"])
        )

        def global_top_k(x: np.ndarray) -> ShardResult:
            hits = glob.search(x, gk, max(g_set["candidates"], gk), g_set["nprobe"])
            return replace(hits, D_norm=normalise(x, hits.D, hits.I))

        self.global_top_k = global_top_k
        self.boxes = [tuple(b) for b in self.local.spec.boxes]

    def hits(self, x: np.ndarray) -> ShardResult:
        """(nq, W, d) window vectors → their region hits with D_norm, nq · W rows."""
        return self.local._hits(x.reshape(-1, x.shape[-1]), self.region_index)

    def answer(self, hits: ShardResult, nq: int, pixels: np.ndarray, boxes=None):
        """Window hits → the scan's local result, after the frames (``refine_result``)."""
        boxes = boxes or self.boxes
        local = aggregate(hits, nq, len(boxes), self.local.k, boxes, self.local.train_boxes)
        return self.local.refine_result(local, pixels, self.embedder.embed_crops_each, self.global_top_k)

    @torch.inference_mode()
    def crops(self, px: np.ndarray, boxes, size: int = 0) -> np.ndarray:
        """Every box cut from ``px`` (nq, 3, S, S) and embedded at ``size`` px (0: the model's input, as the
        scan's ``embed_crops``)."""
        if not size:
            return np.concatenate(
                [self.embedder.embed_crops(px[i : i + 8], boxes) for i in range(0, len(px), 8)]
            )
        out = np.zeros((len(px), len(boxes), self.embedder.dim), np.float32)
        for i in range(len(px)):
            x = torch.tensor(px[i : i + 1])
            batch = torch.cat([self.embedder._crop(x, box, size) for box in boxes])
            out[i] = np.concatenate(
                [
                    self.embedder._run(self.embedder.module, batch[j : j + 64])
                    for j in range(0, len(batch), 64)
                ]
            )
        return out

    @torch.inference_mode()
    def tiles(self, px: np.ndarray) -> np.ndarray:
        """Every box but the whole image pooled from the tile that holds it with the most margin."""
        pos = np.linspace(0, 1 - TILE, TILES)
        tiles = [(x, y, x + TILE, y + TILE) for y in pos for x in pos]
        out = self.embedder.embed_boxes(px, self.boxes[:1]).repeat(len(self.boxes), axis=1)
        side, S = round(TILE * px.shape[-1]), px.shape[-1]
        for t, (x0, y0, _, _) in enumerate(tiles):
            mine = [w for w, b in enumerate(self.boxes) if w and _tile_of(b, tiles) == t]
            rel = [tuple(min(1.0, max(0.0, v)) for v in _relative(self.boxes[w], x0, y0)) for w in mine]
            cut = torch.tensor(
                px[:, :, round(y0 * S) : round(y0 * S) + side, round(x0 * S) : round(x0 * S) + side]
            )
            cut = F.interpolate(cut.float(), size=(TILE_PX, TILE_PX), mode="bicubic", antialias=True)
            cut = cut.round_().clamp_(0, 255).to(torch.uint8).numpy()
            out[:, mine] = np.concatenate(
                [self.embedder.embed_boxes(cut[i : i + 16], rel) for i in range(0, len(px), 16)]
            )
        return out


def _relative(b, x0: float, y0: float):
    return ((b[0] - x0) / TILE, (b[1] - y0) / TILE, (b[2] - x0) / TILE, (b[3] - y0) / TILE)


def _tile_of(b, tiles) -> int:
    def key(t):
        margin = min(b[0] - t[0], b[1] - t[1], t[2] - b[2], t[3] - b[3])
        overlap = max(0, min(b[2], t[2]) - max(b[0], t[0])) * max(0, min(b[3], t[3]) - max(b[1], t[1]))
        return (margin >= -1e-6, margin if margin >= -1e-6 else overlap)

    return max(range(len(tiles)), key=lambda t: key(tiles[t]))


def take(hits: ShardResult, rows: np.ndarray) -> ShardResult:
    cut = lambda a: None if a is None else a[rows]  # noqa: E731
    return ShardResult(
        hits.D[rows],
        hits.I[rows],
        hits.D_raw[rows],
        hits.meta,
        D_norm=cut(hits.D_norm),
        prior=cut(hits.prior),
    )


def cropped(
    hits: ShardResult, crops: ShardResult, chosen: list[list[int]], W: int, W_crops: int | None = None
):
    """``hits`` with every query's ``chosen`` windows' rows replaced by their rows of ``crops``."""
    W_crops = W_crops or W
    rows = np.array([q * W + w for q, c in enumerate(chosen) for w in sorted(set(c))], dtype=np.int64)
    src = np.array([q * W_crops + w for q, c in enumerate(chosen) for w in sorted(set(c))], dtype=np.int64)
    return replace_rows(hits, rows, take(crops, src)) if len(rows) else hits


def voted(hits: ShardResult, nq: int, W: int, per_image: int, m: int) -> list[list[int]]:
    """Per query, for each of the ``m`` images whose best pooled score per window sums highest (positive
    parts), the window that scored it best."""
    kr = hits.I.shape[1]
    images = np.where(hits.I >= 0, layout.image_ids(hits.I, per_image), -1).reshape(nq, W, kr)
    score = np.nan_to_num(hits.D_norm, nan=-np.inf).reshape(nq, W, kr)
    out = []
    for q in range(nq):
        total, best = {}, {}
        for w in range(W):
            for j in range(kr):  # rows are best first: an image's first hit in a window is its best there
                image, s = int(images[q, w, j]), float(score[q, w, j])
                if image < 0 or (image, w) in best:
                    continue
                best[(image, w)] = s
                total[image] = total.get(image, 0.0) + max(s, 0.0)
        top = sorted(total, key=lambda i: -total[i])[:m]
        out.append(
            [max((w for (i, w) in best if i == image), key=lambda w: best[(image, w)]) for image in top]
        )
    return out


def run_seed(
    parts: Parts, queries: pathlib.Path, key_of_source: dict[str, str], cache: pathlib.Path, seed: int
):
    truth = json.loads((queries / "ground_truth.json").read_text())
    files = [queries / t["file"] for t in truth]
    nq, W = len(truth), len(parts.boxes)
    seconds: dict[str, float] = {}

    def cached(name: str, make):
        path = cache / f"{name}-seed{seed}.npy"
        if not path.exists():
            t0 = time.perf_counter()
            np.save(path, make())
            seconds[name] = (time.perf_counter() - t0) / nq
        return np.load(path)

    def pixels(size: int) -> np.ndarray:
        pre = make_preprocess({**parts.embedder.spec["preprocess"], "size": size})
        out = []
        for f in files:
            with Image.open(f) as img:
                out.append(pre(img.convert("RGB")))
        return np.stack(out)

    px448, px576 = cached("px448", lambda: pixels(448)), cached("px576", lambda: pixels(576))
    bigger = parse_grid(BIGGER)[1:]
    x = {
        "pool576": cached("pool576", lambda: parts.embedder.embed_boxes(px576, parts.boxes)),
        "crop448": cached("crop448", lambda: parts.crops(px448, parts.boxes)),
        "crop576": cached("crop576", lambda: parts.crops(px576, parts.boxes)),
        "tiles": cached("tiles", lambda: parts.tiles(px576)),
        "bigger": cached("bigger", lambda: parts.embedder.embed_boxes(px576, bigger)),
        **{
            f"small{s}": cached(f"small{s}", lambda s=s: parts.crops(px576, parts.boxes, s))
            for s in (96, 128)
        },
    }
    hits = {name: parts.hits(v) for name, v in x.items() if name != "bigger"}
    pool, crop = hits["pool576"], hits["crop576"]
    best = lambda h, m: best_windows(h, nq, W, m).tolist()  # noqa: E731
    per_image = len(parts.local.train_boxes)
    # the pooled grid and the bigger pooled windows, searched together
    grid_bigger = parts.hits(np.concatenate([x["pool576"], x["bigger"]], axis=1))
    W2 = W + len(bigger)
    grid_rows = (np.arange(nq)[:, None] * W2 + np.arange(W)).ravel()
    variants = {
        "crop448": (hits["crop448"], px448, None, W),
        "crop576": (crop, px576, None, W),
        "pool576": (pool, px576, None, POOLED),
        **{
            f"hybrid{m}": (cropped(pool, crop, best(pool, m), W), px576, None, POOLED + m)
            for m in (8, 16, 24)
        },
        "vote4+4": (
            cropped(
                pool,
                crop,
                [a + b for a, b in zip(best(pool, 4), voted(pool, nq, W, per_image, 4), strict=True)],
                W,
            ),
            px576,
            None,
            POOLED + 8,
        ),
        "tiles8": (
            cropped(hits["tiles"], crop, best(hits["tiles"], 8), W),
            px576,
            None,
            9 * (TILE_PX / 224) ** 2 + 8,
        ),
        "bigger8": (
            cropped(grid_bigger, crop, best(take(grid_bigger, grid_rows), 8), W2, W),
            px576,
            parts.boxes + [tuple(b) for b in bigger],
            POOLED + 8,
        ),
    }
    for s in (96, 128):
        h = hits[f"small{s}"]
        variants[f"small{s}"] = (h, px576, None, W * (s / 224) ** 2)
        variants[f"small{s}+8"] = (cropped(h, crop, best(h, 8), W), px576, None, W * (s / 224) ** 2 + 8)
    out = {}
    for name, (h, px, boxes, passes) in variants.items():
        out[name] = {
            **score(parts.answer(h, nq, px, boxes), truth, key_of_source),
            "passes_224": round(float(passes), 1),
        }
    return out, seconds


def score(local, truth: list[dict], key_of_source: dict[str, str]) -> dict:
    """recall@1 and AP of ``local_score_norm`` as bench.partial_copies scores a scan's local rank 0."""
    positive, top = [], []
    for q, t in enumerate(truth):
        first = int(np.argmax(np.nan_to_num(local.S_norm[q], nan=-np.inf)))
        key = local.meta.get(int(local.I[q, first]), {}).get("train_key")
        positive.append(bool(t["is_copy"]) and key == key_of_source[t["source_image"]])
        top.append(float(local.S_norm[q, first]))
    copies = sum(bool(t["is_copy"]) for t in truth)
    ap = ranking_metrics(np.nan_to_num(np.array(top), nan=-np.inf), np.array(positive), copies)["ap"]
    return {
        "found": int(sum(positive)),
        "copies": copies,
        "recall@1": sum(positive) / copies,
        "ap": round(ap, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--index-negatives", type=int, default=500)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--negatives", type=int, default=300)
    parser.add_argument("--index-tag", default="whitening_pair_images=400")
    parser.add_argument("--work", default=None)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = bench_domains.work_dir(args.work, bench_domains.DEFAULT_DOMAIN, args.train, args.index_negatives)
    parts = Parts(str(work / f"index-{args.index_tag}"))
    keys = demo_data.source_keys(str(work / "shards"))
    key_of_source = {str(p): keys[p.name] for p in sorted((work / "www").iterdir()) if p.name in keys}
    cache = work / "window-lab"
    cache.mkdir(exist_ok=True)
    seeds, seconds = {}, {}
    for seed in args.seed:
        queries = work / f"partial-queries-seed{seed}-{args.copies}-{args.negatives}"
        if not (queries / "ground_truth.json").exists():
            print(
                f"no queries at {queries}: run python -m bench.partial_copies --seed {seed} first",
                file=sys.stderr,
            )
            return 2
        seeds[seed], seconds[seed] = run_seed(parts, queries, key_of_source, cache, seed)
        print(json.dumps({"seed": seed, **{k: v["found"] for k, v in seeds[seed].items()}}), file=sys.stderr)
    totals = {
        name: {
            "found": sum(s[name]["found"] for s in seeds.values()),
            "copies": sum(s[name]["copies"] for s in seeds.values()),
            "mean_ap": round(float(np.mean([s[name]["ap"] for s in seeds.values()])), 4),
            "passes_224": next(iter(seeds.values()))[name]["passes_224"],
        }
        for name in next(iter(seeds.values()))
    }
    print(
        json.dumps(
            {"bench": "window_lab", "seeds": seeds, "totals": totals, "seconds_per_generation": seconds},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
