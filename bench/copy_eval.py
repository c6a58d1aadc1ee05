"""Copy-detection evaluation of descriptor configurations on real images; prints JSON.

Data (all from ``copyscan.jobs.demo.sample_images.real_image_files``, disjoint, in this order):
- ``--train`` database images (default 1,000);
- ``--copies`` copy queries: ``copy_augment`` of distinct random training images (default 500);
- ``--negatives`` negative queries: unseen images, also passed through ``copy_augment`` (default 500);
- ``--background`` background images for score normalisation (default 338: the rest of the corpus), never in
  the database.

Metrics per configuration and post-processing:
- recall@1: fraction of copy queries whose top-1 database image is their source;
- AP: all queries ranked by top-1 score; an item is positive iff it is a copy query whose top-1 is its source;
  the denominator is the number of copy queries (DISC21 μAP restricted to top-1).

Post-processing (``--post``): ``raw``; ``snorm`` (score normalisation, β=1, background ranks 1–3); ``white``
(PCA-whitening with shrinkage learned on the database vectors, applied to every vector); ``lwhite`` (whitening
learned from ``--pair-copies`` augmented copies of each background image and of each database image that is
*not* a copy source, i.e. no query's source is seen while learning); and each of them followed by ``snorm``.

Configurations are strings ``S<size>:<layer>[+<layer>]:p<gem p>[:r<rmac levels>][:x<scale>,...][:n<norm>]``
(norm ``instance``, the default, or ``imagenet``), e.g. ``S224:head:p3:nimagenet`` or
``S224:block15+block10+block7:p3:r2`` (the default descriptor). Backbone feature maps are computed once per
(images, augmentation seed, size, scale) and cached in ``--cache-dir`` as float16, so configurations that
differ only in pooling cost seconds. ``--end-to-end`` instead runs ``CopyDescriptor.forward`` on the pixels
(the path the pipeline uses) and caches those vectors.

    python -m bench.copy_eval                     # the default descriptor, every post-processing
    python -m bench.copy_eval --seed 1 --end-to-end --configs S224:block15+block10+block7:p3:r2 S224:head:p3:nimagenet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np
import torch

from copyscan.indexing.build.postprocess import (
    apply_whitening,
    background_bias,
    fit_learned_whitening,
    fit_whitening,
    normalised_scores,
)
from copyscan.indexing.embed.augment import copy_augment
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.descriptor import LAYERS, PIXEL_NORMS, CopyDescriptor
from copyscan.indexing.models.effnet import load_efficientnet_lite0
from copyscan.indexing.models.preprocess import preprocess
from copyscan.indexing.read.images import open_rgb
from copyscan.jobs.demo.sample_images import real_image_files

POSTS = ("raw", "snorm", "white", "white+snorm", "lwhite", "lwhite+snorm")
PARTS = ("train", "queries", "background", "pairs")


def parse_config(text: str) -> dict[str, Any]:
    """'S288:block15+head:p3:r1:x1,0.75:nimagenet' → CopyDescriptor options (pixel_norm default: instance)."""
    options: dict[str, Any] = {"regions": 0, "scales": (1.0,), "pixel_norm": "instance"}
    for part in text.split(":"):
        if part.startswith("n") and part[1:] in PIXEL_NORMS:
            options["pixel_norm"] = part[1:]
        elif part.startswith("S") and part[1:].isdigit():
            options["size"] = int(part[1:])
        elif part.startswith("p"):
            options["p"] = float(part[1:])
        elif part.startswith("r"):
            options["regions"] = int(part[1:])
        elif part.startswith("x"):
            options["scales"] = tuple(float(s) for s in part[1:].split(","))
        elif all(name in LAYERS for name in part.split("+")):
            options["layers"] = tuple(part.split("+"))
        else:
            raise CopyscanError(f"cannot parse {part!r} in configuration {text!r}")
    missing = {"size", "p", "layers"} - set(options)
    if missing:
        raise CopyscanError(f"configuration {text!r} lacks {', '.join(sorted(missing))}")
    return options


# ---------------------------------------------------------------------------------------------------------
# Data


class EvalSet:
    """The images of one evaluation: database, queries (copies then negatives), background."""

    def __init__(
        self,
        n_train: int,
        n_copies: int,
        n_negatives: int,
        n_background: int,
        seed: int,
        pair_copies: int = 2,
    ):
        if n_copies > n_train:
            raise CopyscanError("--copies cannot exceed --train (each copy has a distinct source)")
        files = real_image_files(n_train + n_negatives + n_background)
        self.train = files[:n_train]
        self.unseen = files[n_train : n_train + n_negatives]
        self.background = files[n_train + n_negatives :]
        self.seed = seed
        self.sources = np.random.default_rng([seed, 0]).choice(n_train, size=n_copies, replace=False)
        self.n_copies = n_copies
        # Learned whitening learns from augmented pairs of database images that are *not* copy sources (they
        # stand in for a random sample of a large database, where copied images are rare) and of the background
        # images; their augmentations use other seeds than the queries.
        self.pair_train = np.setdiff1d(np.arange(n_train), self.sources)
        self.pair_copies = pair_copies
        self.key = hashlib.sha256(
            json.dumps([[str(f) for f in files], n_train, n_copies, n_negatives, seed, pair_copies]).encode()
        ).hexdigest()[:12]

    def pair_files(self) -> list[pathlib.Path]:
        """Originals of the learned-whitening pairs, one per pair (``pair_copies`` rounds)."""
        once = [self.train[i] for i in self.pair_train] + list(self.background)
        return once * self.pair_copies

    @property
    def n_queries(self) -> int:
        return self.n_copies + len(self.unseen)

    def query_image(self, i: int):
        """Query i: copies first (of train[sources[i]]), then negatives (of unseen images)."""
        rng = np.random.default_rng([self.seed, 1, i])
        if i < self.n_copies:
            return copy_augment(open_rgb(self.train[self.sources[i]]), rng)
        return copy_augment(open_rgb(self.unseen[i - self.n_copies]), rng)

    def pixels(self, size: int, cache: pathlib.Path) -> dict[str, np.ndarray]:
        """{'train', 'queries', 'background', 'pairs'}: (n, 3, size, size) uint8, cached on disk."""
        out = {}
        for part in PARTS:
            path = cache / f"pixels-{self.key}-{part}-S{size}.npy"
            if not path.exists():
                if part == "queries":
                    arrays = [preprocess(self.query_image(i), size) for i in range(self.n_queries)]
                elif part == "pairs":
                    arrays = [
                        preprocess(copy_augment(open_rgb(f), np.random.default_rng([self.seed, 2, j])), size)
                        for j, f in enumerate(self.pair_files())
                    ]
                else:
                    files = self.train if part == "train" else self.background
                    arrays = [preprocess(open_rgb(f), size) for f in files]
                _save(path, np.stack(arrays))
            out[part] = np.load(path)
        return out


def _save(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Embedding


def _batched(fn, pixels: np.ndarray, batch: int = 8) -> list:
    outs = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            outs.append(fn(torch.from_numpy(pixels[start : start + batch])))
    return outs


def _maps_path(
    cache: pathlib.Path, evalset: EvalSet, part: str, size: int, scale: float, norm: str, name: str
) -> pathlib.Path:
    return cache / f"maps-{evalset.key}-{part}-S{size}-x{scale:g}-{norm}-{name}.npy"


def cached_maps(
    evalset: EvalSet, backbone, size: int, scale: float, norm: str, layers: set[str], cache: pathlib.Path
) -> dict[str, dict[str, np.ndarray]]:
    """maps[part][layer]: (n, C, h, w) float16 backbone maps of every image at one (size, scale, pixel_norm)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    pixels = None
    for part in PARTS:
        paths = {name: _maps_path(cache, evalset, part, size, scale, norm, name) for name in layers}
        # one backbone pass taps every layer: later configurations that pool other layers cost no pass
        todo = sorted(
            n for n in LAYERS if not _maps_path(cache, evalset, part, size, scale, norm, n).exists()
        )
        if set(todo) & layers:
            if pixels is None:
                pixels = evalset.pixels(size, cache)
            tapper = CopyDescriptor(backbone, size=size, layers=todo, scales=(scale,), pixel_norm=norm)
            chunks = _batched(lambda x, t=tapper: [m.half() for m in t.feature_maps(x)[0]], pixels[part])
            for j, name in enumerate(todo):
                path = _maps_path(cache, evalset, part, size, scale, norm, name)
                _save(path, torch.cat([c[j] for c in chunks]).numpy())
        out[part] = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    return out


def embed_config(evalset: EvalSet, backbone, options: dict[str, Any], cache: pathlib.Path, end_to_end: bool):
    """{'train', 'queries', 'background', 'pairs'}: (n, d) float32 unit vectors for one configuration."""
    descriptor = CopyDescriptor(backbone, **options)
    if end_to_end:
        key = hashlib.sha256(json.dumps(descriptor.spec(), sort_keys=True).encode()).hexdigest()[:12]
        out = {}
        pixels = None
        for part in PARTS:
            path = cache / f"emb-{evalset.key}-{part}-{key}.npy"
            if not path.exists():
                pixels = pixels or evalset.pixels(descriptor.size, cache)
                _save(path, torch.cat(_batched(descriptor, pixels[part])).numpy())
            out[part] = np.load(path)
        return out
    per_scale = [
        cached_maps(
            evalset, backbone, descriptor.size, scale, descriptor.pixel_norm, set(descriptor.layers), cache
        )
        for scale in descriptor.scales
    ]
    out = {}
    for part in PARTS:
        n = len(per_scale[0][part][descriptor.layers[0]])
        vecs = []
        with torch.inference_mode():
            for start in range(0, n, 256):
                maps = [
                    [
                        torch.from_numpy(np.array(m[part][name][start : start + 256]))
                        for name in descriptor.layers
                    ]
                    for m in per_scale
                ]
                vecs.append(descriptor.pool(maps))
        out[part] = torch.cat(vecs).numpy()
    return out


def time_config(backbone, options: dict[str, Any], n: int = 48) -> float:
    """Milliseconds per image of CopyDescriptor.forward on this machine (batches of 32, after one warm-up)."""
    descriptor = CopyDescriptor(backbone, **options)
    x = torch.randint(0, 256, (32, 3, descriptor.size, descriptor.size), dtype=torch.uint8)
    with torch.inference_mode():
        descriptor(x[:8])
        start = time.perf_counter()
        done = 0
        while done < n:
            descriptor(x)
            done += len(x)
    return 1000 * (time.perf_counter() - start) / done


# ---------------------------------------------------------------------------------------------------------
# Metrics


def evaluate(emb: dict[str, np.ndarray], evalset: EvalSet, post: str, shrinkage: float) -> dict[str, float]:
    xb, xq, xbg = emb["train"], emb["queries"], emb["background"]
    if post.startswith("white"):
        params = fit_whitening(xb, shrinkage=shrinkage)
        xb, xq, xbg = (apply_whitening(params, x) for x in (xb, xq, xbg))
    elif post.startswith("lwhite"):
        originals = np.concatenate([xb[evalset.pair_train], xbg] * evalset.pair_copies)
        params = fit_learned_whitening(originals, emb["pairs"], xb, shrinkage=shrinkage)
        xb, xq, xbg = (apply_whitening(params, x) for x in (xb, xq, xbg))
    sims = xq @ xb.T
    top1 = sims.argmax(1)
    score = sims[np.arange(len(xq)), top1][:, None]
    if "snorm" in post:
        score = normalised_scores(score, background_bias(xq, xbg))
    score = score[:, 0]
    n_copies = evalset.n_copies
    correct = np.zeros(len(xq), dtype=bool)
    correct[:n_copies] = top1[:n_copies] == evalset.sources
    order = np.argsort(-score, kind="stable")
    hits = correct[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    ap = float((precision * hits).sum() / n_copies)
    # the score threshold that keeps 90% precision, and the copies found above it (for calibration notes)
    ok = np.nonzero(precision >= 0.9)[0]
    at90 = int(hits[: ok[-1] + 1].sum()) / n_copies if len(ok) else 0.0
    return {
        "recall@1": float(correct[:n_copies].mean()),
        "ap": ap,
        "recall@p90": at90,
        "threshold@p90": float(score[order][ok[-1]]) if len(ok) else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["S224:block15+block10+block7:p3:r2"])
    parser.add_argument("--post", nargs="+", default=list(POSTS), choices=POSTS)
    parser.add_argument("--shrinkage", type=float, nargs="+", default=[0.3])
    parser.add_argument("--pair-copies", type=int, default=2, help="augmented copies per image for lwhite")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--negatives", type=int, default=500)
    parser.add_argument("--background", type=int, default=338)
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed (copy sources and transforms)")
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~/.cache/copyscan"), "copy_eval")
    )
    parser.add_argument(
        "--end-to-end", action="store_true", help="embed with CopyDescriptor.forward, not cached maps"
    )
    parser.add_argument("--time", action="store_true", help="also measure ms/img of each configuration")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cache = pathlib.Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    evalset = EvalSet(args.train, args.copies, args.negatives, args.background, args.seed, args.pair_copies)
    backbone = load_efficientnet_lite0()
    rows = []
    for text in args.configs:
        options = parse_config(text)
        started = time.perf_counter()
        emb = embed_config(evalset, backbone, options, cache, args.end_to_end)
        dim = emb["train"].shape[1]
        ms = time_config(backbone, options) if args.time else None
        for post in args.post:
            for shrinkage in args.shrinkage if "white" in post else [None]:
                row = {"config": text, "post": post, "dim": dim, "ms_per_img": ms}
                if shrinkage is not None:
                    row["shrinkage"] = shrinkage
                row.update(evaluate(emb, evalset, post, shrinkage or 0.0))
                rows.append(row)
                print(
                    f"{text:38s} {post + ('' if shrinkage is None else f'(a={shrinkage:g})'):18s} "
                    f"R@1 {row['recall@1']:.3f}  AP {row['ap']:.3f}  dim {dim:5d}"
                    + (f"  {ms:.1f} ms/img" if ms else ""),
                    file=sys.stderr,
                    flush=True,
                )
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    result = {
        "data": {
            "train": len(evalset.train),
            "copies": evalset.n_copies,
            "negatives": len(evalset.unseen),
            "background": len(evalset.background),
            "seed": args.seed,
            "end_to_end": args.end_to_end,
        },
        "rows": rows,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
