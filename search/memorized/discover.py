"""Memorised-prompt discovery (Carlini et al. 2023, generate-and-filter), without the training set.

For each prompt, its generations are connected when their tiled ℓ2 is below ``edge_threshold``; a prompt
whose largest clique has ≥ ``min_clique`` members (10 in the paper) is flagged as memorised, and flagged
prompts are ranked by the mean tiled distance inside the clique (closest first). The training set is
needed only afterwards, to verify (``copyscan scan ... verify_pixels=1``).

**Graph size: 128 px.** Generations are aligned like pixel verification (short side, centre crop,
bicubic) but to 128 × 128, and the 4 × 4 tiles are 32 × 32. All pairs of a prompt's 500 generations are
16 matrix products of 500 × 3,072 (25 GFLOP, about a second on one core), against 16× that at 512 px;
downscaling averages sampling noise away (a copy with σ = 0.03 pixel noise is at 0.030 at 512 px and
0.013 at 128) while different content stays different, so the separation only improves.

**Edge threshold: 0.08** (tiled ℓ2 at 128 px), from ``bench/clique_threshold.py`` on 300 distinct real
images (results in ``bench/results/clique_threshold_128_cpu.json``): near-copies of an image (pixel
noise σ ≤ 0.06, brightness +5 %, saturation −10 %, JPEG q75, Gaussian blur r = 1, and all combined) are
at most 0.044 from it; pairs of different images are at least 0.069 (one wallpaper and its colour
variant), 0.150 at the 0.1th percentile and 0.199 at the 1st. Different images with one layout come
closest: two planet sprites centred on white (the test corpus, ``DEMO_PACKAGES``) are 0.103 apart, and
generations of one prompt share layout more than unrelated images do, so the threshold keeps a margin
below that: 0.08 is 1.8× the largest near-copy distance. A 4-pixel shift (0.16 median) or a 5 %
re-framing (0.25 median) is *not* an edge: as in the paper, the tiled distance asks for pixel-aligned
copies. A false 10-clique needs 45 false edges among 10 mutually close generations. Raise it
(``edge_threshold=0.10``) to also catch memorised prompts whose generations differ more, at the risk of
connecting same-layout generations.

Inputs (``--generations``): webdataset shards (a folder of tars, a brace pattern, a list file), the
prompt read from each sample's JSON ``prompt``, else its ``.txt``, else JSON ``caption``; or a folder of
images with a manifest (``manifest.parquet``, ``.jsonl`` or ``.csv``: columns ``path`` relative to the
folder or a full URL, and ``prompt``). Generations of one prompt may span shards.

Layout of the output ``OUT``::

    OUT/memorized.yaml                 resolved config (written first)
    OUT/plan.parquet                   prompt, source, key, task of every generation (made once)
    OUT/prompts/part-00042.parquet     one row per prompt of task 42 (MEMORIZED_SCHEMA without rank)
    OUT/tasks/task_00042.json          task 42's marker, written last: counts, errors, timings
    OUT/memorized.parquet              every prompt, flagged first, ranked (column rank)
    OUT/summary.json
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.fetch import fetch_images
from copyscan.indexing.read.reader import iter_tar
from copyscan.indexing.store import layout, storage
from copyscan.search.memorized.clique import max_clique, threshold_graph
from copyscan.search.memorized.config import MemorizedConfig
from copyscan.search.verify.pixel import decode_fetched, pairwise_tiled

MANIFEST_NAMES = ("manifest.parquet", "manifest.jsonl", "manifest.csv")

PART_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("n_generations", pa.int32()),  # listed for the prompt
        ("n_images", pa.int32()),  # decoded and in the graph
        ("errors", pa.int32()),  # generations that could not be read or decoded (reasons: task marker)
        ("edges", pa.int64()),  # pairs with tiled distance < edge_threshold
        ("clique_size", pa.int32()),
        ("clique_exact", pa.bool_()),  # False: search budget ran out; clique_size is a lower bound
        ("mean_clique_distance", pa.float32()),  # mean tiled distance over the clique's pairs (null < 2)
        ("max_clique_distance", pa.float32()),
        ("flagged", pa.bool_()),  # clique_size >= min_clique
        ("clique_sources", pa.list_(pa.string())),  # members' (source, key), closest to the others first
        ("clique_keys", pa.list_(pa.string())),
        ("clique_member_distance", pa.list_(pa.float32())),  # each member's mean distance to the others
    ]
)
MEMORIZED_SCHEMA = pa.schema([("rank", pa.int32()), *PART_SCHEMA])


# ---------------------------------------------------------------------------------------------------------
# Listing generations and planning tasks


def prompt_of(meta: dict[str, Any], caption: str | None) -> str | None:
    """JSON ``prompt``, else the ``.txt`` caption, else JSON ``caption``; None when there is none."""
    for value in (meta.get("prompt"), caption, meta.get("caption")):
        if isinstance(value, str) and value.strip():
            return value
    return None


def list_shard(url: str, storage_options: storage.StorageOptions | None = None) -> dict[str, Any]:
    """(key, prompt) of every sample of one webdataset tar; samples without a prompt are counted apart."""
    keys, prompts, no_prompt = [], [], []
    for sample in iter_tar(url, storage_options):
        prompt = prompt_of(sample.meta, sample.caption)
        if prompt is None:
            no_prompt.append(sample.key)
        else:
            keys.append(sample.key)
            prompts.append(prompt)
    return {"source": url, "keys": keys, "prompts": prompts, "no_prompt": no_prompt}


def find_manifest(spec: str, storage_options: storage.StorageOptions | None = None) -> str | None:
    """The manifest of an image folder (or ``spec`` itself when it names one); None for shards."""
    if spec.rsplit("/", 1)[-1] in MANIFEST_NAMES or spec.endswith((".parquet", ".jsonl", ".csv")):
        return spec
    fs, path = storage.get_fs(spec, storage_options)
    if "{" in spec or any(c in spec for c in "*?[") or not fs.isdir(path):
        return None
    for name in MANIFEST_NAMES:
        url = storage.join(spec, name)
        if storage.exists(url, storage_options):
            return url
    return None


def read_manifest(url: str, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """(prompt, source, key) of an image-folder manifest; ``key`` is the path as written in it."""
    data = storage.read_bytes(url, storage_options)
    if url.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    elif url.endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(data))
    else:
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        table = pa.Table.from_pylist(rows)
    missing = {"path", "prompt"} - set(table.column_names)
    if missing:
        raise CopyscanError(
            f"manifest {url} lacks column(s) {', '.join(sorted(missing))}; it needs 'path' (relative to "
            f"its folder, or a full URL) and 'prompt'"
        )
    folder = url.rsplit("/", 1)[0]
    paths = [str(p) for p in table["path"].to_pylist()]
    sources = [p if "://" in p or p.startswith("/") else storage.join(folder, p) for p in paths]
    prompts = table["prompt"].to_pylist()
    bad = [p for p, prompt in zip(paths, prompts, strict=True) if not isinstance(prompt, str) or not prompt]
    if bad:
        raise CopyscanError(f"manifest {url}: {len(bad)} row(s) without a prompt, e.g. {bad[0]!r}")
    return pa.table({"prompt": prompts, "source": sources, "key": paths})


def assign_tasks(listing: pa.Table, prompts_per_task: int) -> pa.Table:
    """Add ``task`` to a (prompt, source, key) listing: prompts ordered by where their generations first
    appear (so a task reads few shards), ``prompts_per_task`` per task. Deterministic."""
    first: dict[str, tuple[str, int]] = {}
    for i, (prompt, source) in enumerate(
        zip(listing["prompt"].to_pylist(), listing["source"].to_pylist(), strict=True)
    ):
        if prompt not in first:
            first[prompt] = (source, i)
    ordered = sorted(first, key=lambda p: first[p])
    task_of = {p: i // prompts_per_task for i, p in enumerate(ordered)}
    tasks = pa.array([task_of[p] for p in listing["prompt"].to_pylist()], pa.int32())
    return listing.append_column("task", tasks)


# ---------------------------------------------------------------------------------------------------------
# One task: fetch, decode, graph, clique


@dataclass(frozen=True)
class GraphSpec:
    size: int = 128
    tiles: int = 4
    threshold: float = 0.08
    min_clique: int = 10
    fit: str = "crop"
    max_steps: int = 200_000
    threads: int = 4
    limits: DecodeLimits = DecodeLimits()

    @classmethod
    def of(cls, cfg: MemorizedConfig) -> GraphSpec:
        return cls(
            cfg.graph_size,
            cfg.tiles,
            cfg.edge_threshold,
            cfg.min_clique,
            cfg.fit,
            cfg.clique_max_steps,
            cfg.threads,
            DecodeLimits(max_pixels=cfg.max_image_pixels, min_side=cfg.min_image_side),
        )


def prompt_clique(prompt: str, images: np.ndarray, refs: Sequence[tuple[str, str]], spec: GraphSpec) -> dict:
    """One prompt's row (PART_SCHEMA fields but the error counts): images (n, S, S, 3) uint8 aligned,
    refs[i] = (source, key) of images[i]."""
    D = pairwise_tiled(images, spec.tiles)
    adj = threshold_graph(D, spec.threshold)
    clique = max_clique(adj, spec.max_steps)
    members = list(clique.members)
    size = len(members)
    mean = max_ = None
    member_mean: list[float] = []
    if size >= 2:
        sub = D[np.ix_(members, members)].astype(np.float64)
        pairs = sub[np.triu_indices(size, 1)]
        mean, max_ = float(pairs.mean()), float(pairs.max())
        member_mean = (sub.sum(axis=1) / (size - 1)).tolist()
        order = np.argsort(member_mean, kind="stable")
        members = [members[i] for i in order]
        member_mean = [member_mean[i] for i in order]
    return {
        "prompt": prompt,
        "n_images": len(images),
        "edges": int(adj.sum() // 2),
        "clique_size": size,
        "clique_exact": clique.exact,
        "mean_clique_distance": mean,
        "max_clique_distance": max_,
        "flagged": size >= spec.min_clique,
        "clique_sources": [refs[i][0] for i in members],
        "clique_keys": [refs[i][1] for i in members],
        "clique_member_distance": member_mean,
    }


def process_prompts(
    groups: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    spec: GraphSpec,
    storage_options: storage.StorageOptions | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Rows (PART_SCHEMA) for ``groups`` = [(prompt, [(source, key), ...])], and the task's counts.

    All images of the task are fetched in one ``fetch_images`` call (one read per tar); each prompt is
    then decoded (thread pool) and searched, so only one prompt's pixels are held at a time."""
    t0 = time.perf_counter()
    fetched = fetch_images([ref for _, refs in groups for ref in refs], storage_options, spec.threads)
    timings = {"fetch": time.perf_counter() - t0, "decode": 0.0, "graph": 0.0}
    rows, by_reason, examples = [], defaultdict(int), []

    def decode(ref: tuple[str, str]) -> np.ndarray | tuple[str, str]:
        return decode_fetched(fetched[ref], spec.size, spec.fit, spec.limits)

    with ThreadPoolExecutor(max_workers=max(1, spec.threads)) as pool:
        for prompt, refs in groups:
            refs = list(dict.fromkeys(refs))
            t = time.perf_counter()
            decoded = list(pool.map(decode, refs))
            timings["decode"] += time.perf_counter() - t
            good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
            for ref, d in zip(refs, decoded, strict=True):
                if not isinstance(d, np.ndarray):
                    by_reason[d[0]] += 1
                    if len(examples) < 5:
                        examples.append(
                            {"source": ref[0], "key": ref[1], "reason": d[0], "detail": d[1][:300]}
                        )
            t = time.perf_counter()
            images = (
                np.stack([decoded[i] for i in good])
                if good
                else np.zeros((0, spec.size, spec.size, 3), dtype=np.uint8)
            )
            row = prompt_clique(prompt, images, [refs[i] for i in good], spec)
            timings["graph"] += time.perf_counter() - t
            rows.append({**row, "n_generations": len(refs), "errors": len(refs) - len(good)})
    table = pa.Table.from_pylist(rows, PART_SCHEMA)
    stats = {
        "prompts": len(rows),
        "generations": int(sum(r["n_generations"] for r in rows)),
        "images": int(sum(r["n_images"] for r in rows)),
        "flagged": int(sum(r["flagged"] for r in rows)),
        "inexact": int(sum(not r["clique_exact"] for r in rows)),
        "errors": dict(sorted(by_reason.items())),
        "error_examples": examples,
        "seconds": {k: round(v, 3) for k, v in timings.items()}
        | {"total": round(time.perf_counter() - t0, 3)},
    }
    return table, stats


# ---------------------------------------------------------------------------------------------------------
# Outputs


def finished_tasks(out: str, storage_options: storage.StorageOptions | None = None) -> dict[int, dict]:
    return storage.read_markers(layout.memorized_tasks_dir(out), layout.TASK_MARKER_PREFIX, storage_options)


def run_task(
    out: str,
    task: int,
    groups: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    spec: GraphSpec,
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """Process one task's prompts and write its part, then its marker (last). Returns the marker."""
    table, stats = process_prompts(groups, spec, storage_options)
    storage.write_parquet(layout.memorized_part_url(out, task), table, storage_options)
    marker = {"task": task, **stats}
    storage.write_json(layout.memorized_task_marker_url(out, task), marker, storage_options)
    return marker


def rank_prompts(parts: pa.Table) -> pa.Table:
    """Flagged prompts first, by mean intra-clique distance (closest first); then the rest by clique size
    (largest first); ties by prompt. Adds ``rank`` (0 = the most clearly memorised prompt)."""
    mean = pc.fill_null(parts["mean_clique_distance"], float("inf"))
    order = pa.table(
        {
            "unflagged": pc.invert(parts["flagged"]),
            "mean": pc.if_else(parts["flagged"], mean, float("inf")),
            "size": pc.negate(parts["clique_size"]),
            "prompt": parts["prompt"],
        }
    )
    indices = pc.sort_indices(
        order,
        [("unflagged", "ascending"), ("mean", "ascending"), ("size", "ascending"), ("prompt", "ascending")],
    )
    ranked = parts.take(indices)
    return ranked.add_column(0, "rank", pa.array(np.arange(ranked.num_rows, dtype=np.int32)))


def merge_parts(out: str, tasks: int, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    parts = [
        pq.read_table(_buffer(layout.memorized_part_url(out, t), storage_options), schema=PART_SCHEMA)
        for t in range(tasks)
    ]
    table = pa.concat_tables(parts) if parts else PART_SCHEMA.empty_table()
    return rank_prompts(table)


def _buffer(url: str, storage_options: storage.StorageOptions | None) -> pa.BufferReader:
    return pa.BufferReader(storage.read_bytes(url, storage_options))


def memorized_for_report(
    out: str, storage_options: storage.StorageOptions | None = None, limit: int | None = 50
) -> list[dict[str, Any]]:
    """What the HTML report shows for the flagged prompts of a ``copyscan memorized`` output, ranked.

    One dict per flagged prompt (at most ``limit``; None = all): ``rank``, ``prompt``, ``n_generations``,
    ``clique_size``, ``clique_exact``, ``mean_distance``, ``max_distance`` (tiled ℓ2 at ``graph_size``),
    ``graph_size``, ``edge_threshold`` and ``members``: [{``source``, ``key``, ``mean_distance``}],
    closest to the rest of the clique first. ``copyscan.indexing.read.fetch.fetch_images([(source, key),
    ...])`` gives the images' bytes.
    """
    cfg = (
        yaml.safe_load(storage.read_bytes(storage.join(out, layout.MEMORIZED_CONFIG_NAME), storage_options))
        or {}
    )
    table = pq.read_table(
        _buffer(storage.join(out, layout.MEMORIZED_RESULT_NAME), storage_options), schema=MEMORIZED_SCHEMA
    )
    flagged = table.filter(table["flagged"])
    if limit is not None:
        flagged = flagged.slice(0, limit)
    return [
        {
            "rank": row["rank"],
            "prompt": row["prompt"],
            "n_generations": row["n_generations"],
            "clique_size": row["clique_size"],
            "clique_exact": row["clique_exact"],
            "mean_distance": row["mean_clique_distance"],
            "max_distance": row["max_clique_distance"],
            "graph_size": cfg.get("graph_size"),
            "edge_threshold": cfg.get("edge_threshold"),
            "members": [
                {"source": s, "key": k, "mean_distance": d}
                for s, k, d in zip(
                    row["clique_sources"], row["clique_keys"], row["clique_member_distance"], strict=True
                )
            ],
        }
        for row in flagged.to_pylist()
    ]
