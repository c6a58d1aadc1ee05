"""Copy-detection quality of the whole system, measured the way a user runs it. Prints JSON.

The training set is ``--train`` real images (``copyscan.jobs.demo.sample_images``) downloaded by img2dataset
from a loopback HTTP server into LAION-format shards; the queries are ``--copies`` transformed copies of
distinct training images (``copyscan.indexing.embed.augment.copy_augment``: crop 60–90 %, rotation ±8°,
brightness/contrast/colour, rescale 0.7–1.4×, JPEG 40–85, overlaid text) and ``--negatives`` images from
outside the training set passed through the same transformations. ``copyscan index`` and ``copyscan scan`` run
with their defaults on a local Ray, except that the learned whitening sees augmented copies of
``--pair-images`` training images (400, as a real index sees 10,000 of billions); those images are never copy
sources. The metrics are computed from ``matches/``:

- recall@1: fraction of copies whose rank-0 match is their source;
- AP (per score column): all queries ranked by their rank-0 score; a query is positive iff it is a copy and
  its rank-0 match is its source; denominator = number of copies (DISC21 μAP restricted to top-1);
- the score threshold reaching 90 % / 99 % precision and the recall there.

    python -m bench.copy_detection [--train 1000 --copies 500 --negatives 500 --seed 0]
    python -m bench.copy_detection --domain all --seed 0 1 --train 300 --copies 100 --negatives 100 \
        --pair-images 120 [--embedder effnet-lite0 --embedder sscd=/models/sscd_disc_mixup.onnx]

With several domains, seeds or embedders (``--domain all``, ``--seed 0 1``, ``--embedder`` repeated) each run's
result goes to stderr as it finishes, then a markdown table per (embedder, domain) with the mean over seeds and
each seed's value, the mean over domains, and the JSON of all runs with that summary on stdout
(``bench/domains.py``). Domains other than ``art`` (the default, the corpus copyscan was developed with) get
their own work folder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import domains as bench_domains
from copyscan.indexing.index_config import IndexConfig
from copyscan.indexing.runtime.config import resolve
from copyscan.jobs._runtime import init_ray, setup_logging
from copyscan.jobs.demo import data as demo_data
from copyscan.jobs.demo.sample_images import real_image_files

SCORES = ("score", "score_norm", "score_raw")
# scan verify_whole: the verified answer (verify_rank 0) and its verify_score, in the per-domain table
WHOLE_FIGURES = (
    ("recall@1 verify", ("verify_score", "recall@1")),
    ("AP verify_score", ("verify_score", "ap")),
)


def ranking_metrics(score: np.ndarray, positive: np.ndarray, n_copies: int) -> dict[str, float | None]:
    """AP of ``positive`` ranked by ``score`` (desc) over ``n_copies`` copies; thresholds at 90/99 % precision."""
    order = np.argsort(-score, kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    out: dict[str, float | None] = {"ap": float((precision * hits).sum() / n_copies)}
    for target in (0.90, 0.99):
        ok = np.nonzero(precision >= target)[0]
        last = ok[-1] if len(ok) else None
        out[f"threshold@p{round(target * 100)}"] = float(score[order][last]) if last is not None else None
        out[f"recall@p{round(target * 100)}"] = (
            float(hits[: last + 1].sum() / n_copies) if last is not None else 0.0
        )
    return out


def evaluate(scan_out: pathlib.Path, truth: list[dict], key_of_source: dict[str, str]) -> dict:
    table = pq.read_table(scan_out / "matches")
    top = {r["query_id"]: r for r in table.filter(pc.equal(table["rank"], 0)).to_pylist()}
    copies = [t for t in truth if t["is_copy"]]
    positive = np.array(
        [t["is_copy"] and top[t["file"]]["train_key"] == key_of_source[t["source_image"]] for t in truth]
    )
    result: dict = {
        "queries": len(truth),
        "copies": len(copies),
        "recall@1": float(positive.sum() / len(copies)),
    }
    for name in SCORES:
        score = np.array([top[t["file"]][name] for t in truth], dtype=np.float64)
        result[name] = ranking_metrics(np.nan_to_num(score, nan=-np.inf), positive, len(copies))
    if "verify_score" in table.column_names and table["verify_score"].null_count < table.num_rows:
        result["verify_score"] = _whole_metrics(table, truth, key_of_source, top)
    if "local_rank" in table.column_names and table["local_rank"].null_count < table.num_rows:
        result.update(_local_metrics(table, truth, key_of_source))
    summary = scan_out / "summary.json"  # is_copy's answer: verify_rank 0 where it read verify_score
    threshold = (json.loads(summary.read_text()).get("threshold") or {}) if summary.exists() else {}
    result["flags"] = flag_metrics(table, truth, key_of_source, threshold.get("rank", "rank"))
    return result


def _whole_metrics(table, truth: list[dict], key_of_source: dict[str, str], top: dict[str, dict]) -> dict:
    """Whole-copy verification (scan verify_whole): recall@1 and the ranking metrics of each query's
    ``verify_rank`` 0 row scored by its ``verify_score``; a query none of whose matches was verified keeps
    its rank-0 row and ``score_norm`` (counted in ``unverified_queries``)."""
    answer = {r["query_id"]: r for r in table.filter(pc.equal(table["verify_rank"], 0)).to_pylist()}
    copies = [t for t in truth if t["is_copy"]]
    rows = [answer.get(t["file"]) or top[t["file"]] for t in truth]
    positive = np.array(
        [
            t["is_copy"] and r["train_key"] == key_of_source[t["source_image"]]
            for t, r in zip(truth, rows, strict=True)
        ]
    )
    score = np.array(
        [r["verify_score"] if r.get("verify_rank") == 0 else r["score_norm"] for r in rows], dtype=np.float64
    )
    return {
        "recall@1": float(positive.sum() / len(copies)),
        **ranking_metrics(np.nan_to_num(score, nan=-np.inf), positive, len(copies)),
        "unverified_queries": sum(t["file"] not in answer for t in truth),
    }


def flag_metrics(table, truth: list[dict], key_of_source: dict[str, str], rank: str = "rank") -> dict:
    """How the scan's verdicts did, for each flag column the scan set (``is_copy`` on ``rank`` 0, the
    answer: ``verify_rank`` where the scan flagged ``verify_score``,
    ``is_partial_copy`` on the partial answer, and either): generations flagged, right ones (a copy flagged on
    the row of its source), copies flagged on another image's row, non-copies flagged, the share of copies
    found (recall), the share of non-copies flagged (false-positive rate), the precision on this set, and
    the precision at 50 % copies, the prevalence ``copyscan calibrate`` assumes by default."""
    names = [c for c in ("is_copy", "is_partial_copy") if c in table.column_names]
    rows = table.select(["query_id", "train_key", rank, *names]).to_pylist()
    flagged: dict[str, dict[str, set]] = {"is_copy": {}, "is_partial_copy": {}, "either": {}}
    for r in rows:
        hits = []
        if r.get("is_copy") and r[rank] == 0:
            hits.append("is_copy")
        if r.get("is_partial_copy"):
            hits.append("is_partial_copy")
        for name in hits + (["either"] if hits else []):
            flagged[name].setdefault(r["query_id"], set()).add(r["train_key"])
    copies = [t for t in truth if t["is_copy"]]
    negatives = len(truth) - len(copies)
    set_by_scan = [c for c in names if table[c].null_count < table.num_rows]
    out = {}
    for name in set_by_scan + (["either"] if len(set_by_scan) == 2 else []):
        by_query = flagged[name]
        right = sum(key_of_source[t["source_image"]] in by_query.get(t["file"], ()) for t in copies)
        wrong_source = sum(t["file"] in by_query for t in copies) - right
        false_flags = sum(t["file"] in by_query for t in truth if not t["is_copy"])
        recall = right / len(copies) if copies else float("nan")
        fpr = false_flags / negatives if negatives else float("nan")
        wrong_rate = wrong_source / len(copies) if copies else float("nan")
        out[name] = {
            "flagged": len(by_query),
            "right": right,
            "wrong_source": wrong_source,
            "false_flags": false_flags,
            "recall": recall,
            "false_positive_rate": fpr,
            "precision": right / len(by_query) if by_query else None,
            "precision_at_50pct": recall / (recall + wrong_rate + fpr) if recall + wrong_rate + fpr else None,
        }
    return out


def _local_metrics(table, truth: list[dict], key_of_source: dict[str, str]) -> dict:
    """Region matching (partial copies): the same metrics on each query's local_rank-0 row, on the row
    best by max(score_norm, local_score_norm) ("either": a copy is found by either path), and, when the
    scan ran dense verification (dense_verify), on the verified row with the highest dense_z (dense_rank
    0) scored by its dense_score (the local_rank-0 row and its local_score_norm for a query none of whose
    candidates was verified)."""
    copies = [t for t in truth if t["is_copy"]]
    names = ["query_id", "train_key", "local_rank", "score_norm", "local_score_norm"]
    names += ["crop_score_norm"] if "crop_score_norm" in table.column_names else []
    dense = "dense_score" in table.column_names and table["dense_score"].null_count < table.num_rows
    names += ["dense_z", "dense_score"] if dense else []
    rows = table.select(names).to_pylist()
    by_query: dict[str, list[dict]] = {}
    for r in rows:
        by_query.setdefault(r["query_id"], []).append(r)
    out = {}
    nan = float("nan")

    def either(r):
        values = [v for v in (r["score_norm"], r["local_score_norm"]) if v is not None]
        return max(values) if values else -np.inf

    def local_top(rs):
        return next((r for r in rs if r["local_rank"] == 0), None)

    def dense_score(r):
        return r["dense_score"] if r["dense_score"] is not None else r["local_score_norm"]

    pickers = {
        "local_score_norm": local_top,
        "either_norm": lambda rs: max(rs, key=either, default=None),
    }
    values = {"local_score_norm": lambda r: r["local_score_norm"], "either_norm": either}
    if dense:
        pickers["dense_score"] = lambda rs: (
            max((r for r in rs if r["dense_z"] is not None), key=lambda r: r["dense_z"], default=None)
            or local_top(rs)
        )
        values["dense_score"] = dense_score
    for name, pick in pickers.items():
        best = {q: pick(rs) for q, rs in by_query.items()}
        positive = np.array(
            [
                t["is_copy"]
                and best.get(t["file"]) is not None
                and best[t["file"]]["train_key"] == key_of_source[t["source_image"]]
                for t in truth
            ]
        )
        value = values[name]
        score = np.array(
            [value(best[t["file"]]) if best.get(t["file"]) is not None else nan for t in truth],
            dtype=np.float64,
        )
        score = np.nan_to_num(score, nan=-np.inf)  # None (no local match) became NaN
        out[name] = {
            "recall@1": float(positive.sum() / len(copies)),
            **ranking_metrics(score, positive, len(copies)),
        }
        if name == "local_score_norm" and "crop_score_norm" in names:
            # localise, then search (scan region_refine): local rank-0 rows a query crop searched in the
            # global index found too, over all queries and over the copies found
            by_crop = [
                bool(best.get(f) and best[f]["crop_score_norm"] is not None)
                for f in (t["file"] for t in truth)
            ]
            out[name]["top1_found_by_crop"] = int(sum(by_crop))
            out[name]["copies_found_by_crop"] = int(np.sum(positive & np.array(by_crop)))
    return out


def paired_keys(index_url: str, manifest: dict, pair_images: int) -> set[str]:
    """Keys of the training images the learned whitening gets augmented copies of: the first
    ``pair_quota`` rows of each shard (``copyscan.indexing.index_ray.pair_spec``), whichever whitening this
    index uses, so that every configuration is measured on the same queries."""
    from copyscan.indexing.embed.decode import pair_quota
    from copyscan.indexing.store import layout, storage

    shards = manifest["embedding_shards"]
    keys: set[str] = set()
    for entry in shards:
        meta = pq.read_table(layout.metadata_url(index_url, entry["shard"]), columns=["key"])
        first = meta.column("key").to_pylist()[: pair_quota(pair_images, len(shards), entry["shard"])]
        url = layout.pairs_url(index_url, entry["shard"])
        if entry.get("pairs") and storage.exists(url):
            rows = np.unique(storage.load_npz(url)["rows"])
            assert set(meta.column("key").take(rows).to_pylist()) == set(first), (
                "pairs are not the first rows"
            )
        keys.update(first)
    return keys


def parse_embedder(text: str) -> tuple[str, list[str]]:
    """--embedder 'NAME' or 'NAME=WEIGHTS' → (its label in the table, its index config overrides).

    The default embedder without weights adds no override, so its index is the one built without
    --embedder."""
    from copyscan.indexing.models.embedders import DEFAULT_EMBEDDER, EMBEDDERS

    name, _, weights = text.partition("=")
    if name not in EMBEDDERS:
        raise SystemExit(f"--embedder {text!r}: unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}")
    if not weights:
        return name, [] if name == DEFAULT_EMBEDDER else [f"embedder={name}"]
    return f"{name} ({pathlib.Path(weights).name})", [f"embedder={name}", f"weights={weights}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--negatives", type=int, default=500)
    bench_domains.add_arguments(parser)
    parser.add_argument(
        "--embedder",
        action="append",
        default=[],
        metavar="NAME[=WEIGHTS]",
        help="an embedder to compare, each with its own index (repeatable), e.g. effnet-lite0 "
        "sscd=/models/sscd_disc_mixup.onnx; default: the index config's (effnet-lite0)",
    )
    parser.add_argument("--work", default=None, help="work folder (default: ~/.cache/copyscan/bench/...)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the index and scan (shards are kept)")
    parser.add_argument(
        "--pair-images",
        type=int,
        default=400,
        help="index whitening_pair_images: training images whose augmented copies the learned whitening sees "
        "(never used as copy sources)",
    )
    parser.add_argument(
        "--scan", action="append", default=[], metavar="KEY=VALUE", help="a scan config override (repeatable)"
    )
    parser.add_argument("overrides", nargs="*", help="index config overrides, e.g. whitening=pca")
    args = parser.parse_args(argv)
    embedders = [parse_embedder(text) for text in args.embedder] or [("effnet-lite0", [])]
    setup_logging()
    init_ray()
    runs = []
    for domain in bench_domains.domains(args.domain):
        for label, embedder_overrides in embedders:
            for seed in args.seed:
                result = run_one(args, domain, [*embedder_overrides, *args.overrides], seed)
                runs.append({"embedder_label": label, **result})
                print(json.dumps(result), file=sys.stderr, flush=True)
    if len(runs) == 1:
        print(json.dumps(runs[0], indent=2))
        return 0
    figures = bench_domains.FIGURES + (WHOLE_FIGURES if any("verify_score" in r for r in runs) else ())
    summary = bench_domains.summarise(runs, figures)
    print(bench_domains.table(summary, figures), file=sys.stderr)
    sizes = {
        "train": args.train,
        "copies": args.copies,
        "negatives": args.negatives,
        "pairs": args.pair_images,
    }
    print(json.dumps({"bench": "copy_detection", "sizes": sizes, "summary": summary, "runs": runs}, indent=2))
    return 0


def run_one(args: argparse.Namespace, domain: str, index_overrides: list[str], seed: int) -> dict:
    """One index (built once, reused) and one scan of ``seed``'s queries on ``domain``: the result dict."""
    t0 = time.time()
    work = bench_domains.work_dir(args.work, domain, args.train, args.negatives)
    files = real_image_files(args.train + args.negatives, domain=domain)
    train, unseen = files[: args.train], files[args.train :]

    www = work / "www"
    staged = demo_data.stage_images(train, www)
    with demo_data.serve_directory(www) as base_url:
        url_list = demo_data.write_url_list(staged, base_url, str(work / "url_list.parquet"), root=www)
        demo_data.run_img2dataset(url_list, str(work / "shards"), number_sample_per_shard=250, thread_count=8)
    keys = demo_data.source_keys(str(work / "shards"))
    key_of_source = {str(p): keys[p.relative_to(www).as_posix()] for p in staged}

    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import parse_overrides
    from copyscan.search.scan_config import ScanConfig
    from copyscan.search.scan_ray import run_scan

    overrides = [f"whitening_pair_images={args.pair_images}", *index_overrides]
    tag = "-".join(sorted(overrides)).replace("/", "_")
    scan_tag = "".join(f"-{o}" for o in sorted(args.scan)).replace("/", "_")
    index_out, scan_out = work / f"index-{tag}", work / f"scan-{tag}{scan_tag}-seed{seed}"
    queries = work / f"queries-{tag}-seed{seed}"
    if args.fresh:
        for folder in (index_out, scan_out, queries):
            shutil.rmtree(folder, ignore_errors=True)
    reused = (index_out / "manifest.json").exists(), (scan_out / "summary.json").exists()
    t_index = time.time()
    manifest = run_index(
        resolve(
            IndexConfig,
            {"shards": str(work / "shards"), "out": str(index_out)},
            parse_overrides(overrides),
        )
    )
    t_queries = time.time()
    # Images whose augmented copies the learned whitening saw are not copied by any query: in a real index
    # they are ~10k of billions, so a query copying one of them is rare; here they would flatter the result.
    seen = paired_keys(str(index_out), manifest, args.pair_images)
    sources = [p for p in staged if key_of_source[str(p)] not in seen]
    shutil.rmtree(queries, ignore_errors=True)  # a run with other --copies/--negatives left its files there
    truth = demo_data.make_generated_images(
        sources, unseen, str(queries), n_copies=args.copies, n_unrelated=args.negatives, seed=seed
    )
    markers = sorted((scan_out / "chunks").glob("chunk_*.json")) if scan_out.exists() else []
    if any(json.loads(m.read_text()).get("index_build_id") != manifest["build_id"] for m in markers):
        shutil.rmtree(scan_out)  # scanned against an earlier build of this index
        reused = reused[0], False
    t_scan = time.time()
    run_scan(
        resolve(
            ScanConfig,
            {"index": str(index_out), "queries": str(queries), "out": str(scan_out)},
            parse_overrides(args.scan),
        )
    )
    result = {
        "bench": "copy_detection",
        "train_images": manifest["ntotal"],
        "negatives": args.negatives,
        "domain": domain,
        "seed": seed,
        "overrides": index_overrides,
        "scan_overrides": args.scan,
        "embedder": {"name": manifest["embedder"]["name"], "fingerprint": manifest["embedder_fingerprint"]},
        "index": manifest["index"]["factory"],
        "whitening": manifest["whitening"],
        "copy_sources": {"candidates": len(sources), "excluded_paired": len(staged) - len(sources)},
        **evaluate(scan_out, truth, key_of_source),
        "reused_earlier_outputs": {"index": reused[0], "scan": reused[1]},
        "seconds": {
            "total": round(time.time() - t0, 1),
            "index_job": round(t_queries - t_index, 1),
            "make_queries": round(t_scan - t_queries, 1),
            "scan_job": round(time.time() - t_scan, 1),
        },
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
