"""Memorisation scores per prompt, their distribution, and two checkpoints' scores compared.

A prompt's score is the mean of its generations' scores (``sampling.py`` defines a generation's). Two
runs made with the same ``seed`` give a prompt the same seeds (``prompts.generation_seed``), so the
prompts both runs share are compared pairwise: the same prompt and noise, another model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from copyscan.indexing.store import layout, storage
from copyscan.search.generate.prompts import generation_key

PROMPT_SCORES_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),  # 0 = the highest score
        ("prompt", pa.string()),
        ("prompt_index", pa.int32()),
        ("origin", pa.string()),
        ("train_count", pa.int32()),
        ("generations", pa.int32()),
        ("score", pa.float32()),  # mean memorisation score over the prompt's generations
        ("score_max", pa.float32()),
        ("score_min", pa.float32()),
        ("shard", pa.int32()),
        ("keys", pa.list_(pa.string())),
    ]
)


def prompt_scores(markers: dict[int, dict[str, Any]]) -> pa.Table:
    """One row per prompt (``PROMPT_SCORES_SCHEMA``), highest mean score first (ties: plan order)."""
    rows = []
    for shard, marker in markers.items():
        for p in marker["prompt_scores"]:
            s = np.asarray(p["scores"], dtype=np.float64)
            rows.append(
                {
                    "prompt": p["prompt"],
                    "prompt_index": p["prompt_index"],
                    "origin": p["origin"],
                    "train_count": p["train_count"],
                    "generations": len(s),
                    "score": float(s.mean()),
                    "score_max": float(s.max()),
                    "score_min": float(s.min()),
                    "shard": shard,
                    "keys": [generation_key(p["prompt_index"], g) for g in range(len(s))],
                }
            )
    rows.sort(key=lambda r: (-r["score"], r["prompt_index"]))
    for rank, row in enumerate(rows):
        row["rank"] = rank
    return pa.Table.from_pylist(rows, schema=PROMPT_SCORES_SCHEMA)


def score_distribution(scores: Sequence[float]) -> dict[str, Any]:
    """Count, mean and quantiles of per-prompt scores (the summary and the nightly history)."""
    if not len(scores):
        return {"count": 0}
    s = np.asarray(scores, dtype=np.float64)
    q = np.quantile(s, [0.5, 0.9, 0.99])
    return {
        "count": int(s.size),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "min": float(s.min()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": float(s.max()),
    }


def read_prompt_scores(gen_out: str, so: storage.StorageOptions | None = None) -> pa.Table | None:
    """``GEN/prompt_scores.parquet`` of a finished generation run, None when there is none."""
    url = storage.join(gen_out, layout.GENERATE_SCORES_NAME)
    if not storage.exists(url, so):
        return None
    return pq.read_table(io.BytesIO(storage.read_bytes(url, so)))


def compare_scores(this: pa.Table, other: pa.Table, checkpoint: str, top: int = 10) -> dict[str, Any]:
    """``this`` run's per-prompt scores against ``other``'s (checkpoint ``checkpoint``): both
    distributions, and over the prompts both scored, the mean change and the prompts whose score rose
    most."""
    before = dict(zip(other["prompt"].to_pylist(), other["score"].to_pylist(), strict=True))
    pairs = [
        (p, s, before[p])
        for p, s in zip(this["prompt"].to_pylist(), this["score"].to_pylist(), strict=True)
        if p in before
    ]
    change = np.asarray([s - b for _, s, b in pairs], dtype=np.float64)
    rose = sorted(pairs, key=lambda x: x[2] - x[1])[:top]
    return {
        "checkpoint": checkpoint,
        "distribution": score_distribution(other["score"].to_pylist()),
        "shared_prompts": len(pairs),
        "mean_change": float(change.mean()) if len(pairs) else None,
        "prompts_higher": int((change > 0).sum()),
        "most_risen": [{"prompt": p, "score": s, "before": b} for p, s, b in rose if s > b],
    }


def top_prompts(
    scores: pa.Table, matches: pa.Table | None = None, memorized: pa.Table | None = None, top: int = 10
) -> list[dict[str, Any]]:
    """The ``top`` prompts by score, each next to its largest clique (``memorized``: a ``copyscan
    memorized`` result) and the best training match of its generations (``matches``: a scan's rank-0
    rows with ``prompt``, ``query_id``, ``train_key``, ``caption``, ``score``, ``is_copy``)."""
    cliques = {}
    if memorized is not None:
        for r in memorized.select(["prompt", "clique_size", "n_generations", "flagged"]).to_pylist():
            cliques[r["prompt"]] = r
    best: dict[str, dict[str, Any]] = {}
    if matches is not None:
        columns = ["prompt", "query_id", "train_key", "caption", "score", "is_copy"]
        for r in matches.select(columns).to_pylist():
            if r["prompt"] is not None and (
                r["prompt"] not in best or r["score"] > best[r["prompt"]]["score"]
            ):
                best[r["prompt"]] = {k: r[k] for k in columns if k != "prompt"}
    rows = []
    for r in scores.slice(0, top).to_pylist():
        clique = cliques.get(r["prompt"])
        rows.append(
            {
                "prompt": r["prompt"],
                "score": r["score"],
                "score_max": r["score_max"],
                "train_count": r["train_count"],
                "clique_size": clique["clique_size"] if clique else None,
                "flagged": clique["flagged"] if clique else None,
                "best_match": best.get(r["prompt"]),
            }
        )
    return rows
