"""The prompts of a generation run and its plan: which prompt goes to which shard, with which seeds.

Prompt sources (``GenerateConfig``), in this order, a prompt given twice kept once (the first):

- ``prompts=FILE``: a text file, one prompt a line (blank lines skipped and counted), or a parquet file
  with a column ``prompt`` (else ``caption``, else ``TEXT``; null or blank rows skipped and counted);
- ``captions_from=INDEX captions=N``: N captions of the index's training images (its
  ``embeddings/metadata/*.parquet``, column ``caption``), the Somepalli et al. setting. ``caption_pick=random``
  draws them without replacement with ``seed`` from the distinct captions in sorted order (the draw does
  not depend on how the index is sharded); ``duplicated`` takes the most repeated captions first (ties
  in caption order), Carlini et al.'s choice of prompts. Each caption keeps ``train_count``, the number
  of training images carrying it.

Generation ``g`` of a prompt has seed ``generation_seed(seed, prompt, g)``: a function of the text, not
its position, so the same prompt gets the same initial noise in every run and checkpoint (nightly runs
differ by the model alone), and adding prompts changes no other prompt's images.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store import layout, storage
from copyscan.search.generate.config import GenerateConfig

PROMPT_COLUMNS = ("prompt", "caption", "TEXT")
PLAN_SCHEMA = pa.schema(
    [
        ("prompt_index", pa.int32()),  # position in the plan: generation keys are {prompt_index:06d}_{g:03d}
        ("prompt", pa.string()),
        ("origin", pa.string()),  # "file" or "captions"
        ("train_count", pa.int32()),  # training images with this caption (captions only, else null)
        ("shard", pa.int32()),
    ]
)


def generation_seed(seed: int, prompt: str, generation: int) -> int:
    """The seed of generation ``generation`` of ``prompt``: 31 bits of SHA-256 of (seed, prompt, g)."""
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{generation}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def generation_key(prompt_index: int, generation: int) -> str:
    return f"{prompt_index:06d}_{generation:03d}"


def read_prompt_file(url: str, so: storage.StorageOptions | None = None) -> tuple[list[str], int]:
    """The prompts of a text or parquet file, in file order, and how many blank rows were skipped."""
    if not storage.exists(url, so):
        raise CopyscanError(f"prompt file {url} does not exist")
    data = storage.read_bytes(url, so)
    if url.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        column = next((c for c in PROMPT_COLUMNS if c in table.column_names), None)
        if column is None:
            raise CopyscanError(
                f"prompt file {url} has none of the columns {', '.join(PROMPT_COLUMNS)} "
                f"(it has {', '.join(table.column_names)})"
            )
        values = table[column].to_pylist()
    else:
        try:
            values = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise CopyscanError(f"prompt file {url} is not UTF-8 text or .parquet: {exc}") from None
    prompts = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    return prompts, len(values) - len(prompts)


def training_captions(index: str, so: storage.StorageOptions | None = None) -> dict[str, int]:
    """Distinct non-blank captions of an index's training images, with their number of images."""
    folder = storage.join(index, layout.EMBEDDINGS_DIR, "metadata")
    files = (
        [u for u in storage.list_files(folder, so) if u.endswith(".parquet")]
        if storage.exists(folder, so)
        else []
    )
    if not files:
        raise CopyscanError(
            f"{index} holds no training metadata ({folder}/*.parquet): is it a copyscan index?"
        )
    counts: dict[str, int] = {}
    for url in sorted(files):
        table = pq.read_table(io.BytesIO(storage.read_bytes(url, so)), columns=["caption"])
        for caption in table["caption"].to_pylist():
            if isinstance(caption, str) and caption.strip():
                counts[caption.strip()] = counts.get(caption.strip(), 0) + 1
    return counts


def pick_captions(counts: dict[str, int], n: int, pick: str, seed: int) -> list[tuple[str, int]]:
    """``n`` (caption, train_count) pairs: a seeded draw (``random``) or the most repeated (``duplicated``)."""
    ordered = sorted(counts)
    if pick == "duplicated":
        chosen = sorted(ordered, key=lambda c: -counts[c])[:n]
    else:
        rows = np.random.default_rng(seed).choice(len(ordered), size=min(n, len(ordered)), replace=False)
        chosen = [ordered[i] for i in rows]
    return [(c, counts[c]) for c in chosen]


def make_plan(cfg: GenerateConfig) -> tuple[pa.Table, dict[str, Any]]:
    """The run's prompts (``PLAN_SCHEMA``) and what reading them skipped."""
    so = cfg.storage_options
    if not cfg.prompts and not (cfg.captions_from and cfg.captions > 0):
        raise CopyscanError(
            "no prompt source: give prompts=FILE, or captions_from=INDEX with captions=N, or both"
        )
    rows: list[tuple[str, str, int | None]] = []
    counts: dict[str, Any] = {"blank_prompts": 0, "repeated_prompts": 0}
    if cfg.prompts:
        prompts, counts["blank_prompts"] = read_prompt_file(cfg.prompts, so)
        rows += [(p, "file", None) for p in prompts]
    if cfg.captions_from and cfg.captions:
        available = training_captions(cfg.captions_from, so)
        picked = pick_captions(available, cfg.captions, cfg.caption_pick, cfg.seed)
        counts["captions_available"] = len(available)
        rows += [(c, "captions", n) for c, n in picked]
    seen: set[str] = set()
    kept = []
    for prompt, origin, train_count in rows:
        if prompt in seen:
            counts["repeated_prompts"] += 1
            continue
        seen.add(prompt)
        kept.append((prompt, origin, train_count))
    if not kept:
        raise CopyscanError("no prompt to generate from: the prompt file and the captions gave none")
    table = pa.table(
        {
            "prompt_index": pa.array(range(len(kept)), pa.int32()),
            "prompt": [p for p, _, _ in kept],
            "origin": [o for _, o, _ in kept],
            "train_count": pa.array([n for _, _, n in kept], pa.int32()),
            "shard": pa.array([i // cfg.prompts_per_shard for i in range(len(kept))], pa.int32()),
        },
        schema=PLAN_SCHEMA,
    )
    return table, counts


def shard_prompts(plan: pa.Table) -> dict[int, list[dict[str, Any]]]:
    """shard → its plan rows, in plan order."""
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for row in plan.to_pylist():
        by_shard.setdefault(row["shard"], []).append(row)
    return by_shard
