"""The name of every output location copyscan writes, and the id scheme. One place, so jobs agree.

An index (``copyscan index --out OUT``)::

    OUT/index.yaml                                  resolved config of the index job
    OUT/manifest.json                               written last: what the index is and how it was made
    OUT/_lease.json                                 while a run writes OUT (index and scan): its lease (lease.py)
    OUT/embeddings/img_emb/img_emb_00042.npy        (n, d) float16, L2-normalised (clip-retrieval layout)
    OUT/embeddings/metadata/metadata_00042.parquet  one row per vector: key, url, caption, size, ...
    OUT/embeddings/pairs/pairs_00042.npz            augmented copies of a few images, embedded (whitening)
    OUT/embeddings/stats/stats_00042.json           per-shard success marker, written last; counts and
                                                    rejections with reasons
    OUT/index/IVF256_PQ32np/whitening.npz           PCA-whitening learned on the database (mean, proj)
    OUT/index/IVF256_PQ32np/background.npz          whitened background sample (ids, vectors) for score_norm
    OUT/index/IVF256_PQ32np/train.json              what training saw
    OUT/index/IVF256_PQ32np/trained.index           the trained, empty index (written after the two above)
    OUT/index/IVF256_PQ32np/shard-00000.index       filled index shards
    OUT/index/IVF256_PQ32np/shard-00000.json        per-index-shard success marker, written last
    OUT/index/IVF256_PQ32np/norms/norms_00042.npy   (n, stages) float32 whitening norms of embedding shard
                                                    42 (fast exact re-ranking), written before the marker
    OUT/regions/index/<factory>/density/density_00042.npy   (n,) float32 region densities (region index
                                                    only: mean cosine to the 3 nearest background regions
                                                    of other images), written before the marker
    OUT/regions/...                                 with ``regions=true``: the region index (partial
                                                    copies), laid out like OUT itself (embeddings/img_emb,
                                                    pairs, index/<factory>/..., manifest.json); its row
                                                    ``i · R + r`` is box r of image i of the shard
    OUT/calibration.json                            ``copyscan calibrate``: the precision/recall tables
    OUT/calibration/partial-seedS/                  ``calibrate partial=N``: spec.json, queries/, scan/

A scan (``copyscan scan --out RUN``), its report and a memorised-prompt run::

    RUN/run.yaml                                    resolved config of the scan
    RUN/matches/part-00007.parquet                  the matches of query chunk 7 (MATCHES_SCHEMA)
    RUN/query_emb/query_emb_00007.npy               (nq, d) float16 query descriptors of chunk 7
    RUN/query_emb/query_ids_00007.parquet           their query ids
    RUN/chunks/chunk_00007.json                     per-chunk success marker, written last
    RUN/summary.json                                written at the end of every run
    RUN/report/                                     ``copyscan report``: stats.json, histograms.parquet,
                                                    similarities.parquet, duplicates.parquet, report.html
    MEM/memorized.yaml, plan.parquet                ``copyscan memorized --out MEM``: config, prompt plan
    MEM/prompts/part-00003.parquet                  cliques of task 3; MEM/tasks/task_00003.json its marker
    MEM/memorized.parquet, summary.json             the ranked prompts, written last

A generation run (``copyscan generate --out GEN``)::

    GEN/generate.yaml, plan.parquet                 resolved config; the prompts, their shard (made once)
    GEN/shards/00003.tar                            webdataset shard 3: {key}.jpg, .json (prompt, seed,
                                                    settings, checkpoint id, memorisation score), .txt
    GEN/markers/shard_00003.json                    shard 3's marker, written last: counts, per-prompt scores
    GEN/prompt_scores.parquet, summary.json         scores per prompt (highest first), written last

Nightly history (``copyscan nightly --history H``)::

    H/history/CHECKPOINT.parquet                    one row per checkpoint
    H/runs/CHECKPOINT/                              its scan (RUN above)
    H/regression/CHECKPOINT.json                    its comparison with the previous run and the baseline
    H/reports/CHECKPOINT/                           its report
    H/generations/CHECKPOINT/                       ``--generate``: its generations (GEN above)
    H/memorized/CHECKPOINT/                         ``--generate``: its memorised prompts (MEM above)

Vector ids pack (embedding shard, row) into one int64: ``shard << 32 | row``. Ids therefore never depend
on how many vectors other shards hold, so shards can be embedded and indexed in any order and resumed.
"""

from __future__ import annotations

import re

import numpy as np

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.store.storage import join

CONFIG_NAME = "index.yaml"
LEASE_NAME = "_lease.json"  # of an index and of a scan run, held while a run writes (lease.py)
MANIFEST_NAME = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"

ROW_BITS = 32
ROW_MASK = (1 << ROW_BITS) - 1
MAX_SHARDS = 1 << 30


REGIONS_DIR = "regions"


def regions_root(out: str) -> str:
    """Root of the region index (partial copies) inside index output ``out``: the same layout as an index
    output (``embeddings/``, ``index/``, ``manifest.json``), its row ``i · R + r`` being box r of image i."""
    return join(out, REGIONS_DIR)


def emb_url(out: str, shard: int) -> str:
    return join(out, EMBEDDINGS_DIR, "img_emb", f"img_emb_{shard:05d}.npy")


def metadata_url(out: str, shard: int) -> str:
    return join(out, EMBEDDINGS_DIR, "metadata", f"metadata_{shard:05d}.parquet")


def pairs_url(out: str, shard: int) -> str:
    """Augmented copies of a few of the shard's images, embedded: {"rows", "x"} (learned whitening)."""
    return join(out, EMBEDDINGS_DIR, "pairs", f"pairs_{shard:05d}.npz")


def stats_url(out: str, shard: int) -> str:
    return join(out, EMBEDDINGS_DIR, "stats", f"stats_{shard:05d}.json")


def stats_dir(out: str) -> str:
    return join(out, EMBEDDINGS_DIR, "stats")


_STATS_RE = re.compile(r"stats_(\d+)\.json$")


def shard_of_stats_name(name: str) -> int | None:
    match = _STATS_RE.search(name)
    return int(match.group(1)) if match else None


def index_name(factory: str) -> str:
    """Folder name for an index factory string: ``IVF256,PQ32np`` → ``IVF256_PQ32np``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_")


def index_dir(out: str, factory: str) -> str:
    return join(out, INDEX_DIR, index_name(factory))


def trained_index_url(out: str, factory: str) -> str:
    return join(index_dir(out, factory), "trained.index")


def whitening_url(out: str, factory: str) -> str:
    return join(index_dir(out, factory), "whitening.npz")


def background_url(out: str, factory: str) -> str:
    return join(index_dir(out, factory), "background.npz")


def train_info_url(out: str, factory: str) -> str:
    return join(index_dir(out, factory), "train.json")


def index_shard_url(out: str, factory: str, shard: int) -> str:
    return join(index_dir(out, factory), f"shard-{shard:05d}.index")


def density_url(out: str, factory: str, shard: int) -> str:
    """(n,) float32: region densities of a region index's embedding shard ``shard``
    (``copyscan.indexing.build.ivf``)."""
    return join(index_dir(out, factory), "density", f"density_{shard:05d}.npy")


def norms_url(out: str, factory: str, shard: int) -> str:
    """(n, stages) float32: the norms each whitening stage divided embedding shard ``shard``'s vectors by."""
    return join(index_dir(out, factory), "norms", f"norms_{shard:05d}.npy")


def index_shard_marker_url(out: str, factory: str, shard: int) -> str:
    return join(index_dir(out, factory), f"shard-{shard:05d}.json")


def pack_ids(shard: int, rows: np.ndarray) -> np.ndarray:
    """int64 ids of ``rows`` (int array) of embedding shard ``shard``."""
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard id {shard} out of range")
    return (np.int64(shard) << ROW_BITS) | rows.astype(np.int64)


def image_ids(region_ids: np.ndarray, per_image: int) -> np.ndarray:
    """Region ids ``shard << 32 | (row · per_image + box)`` → the ids ``shard << 32 | row`` of their images;
    -1 stays -1 (per_image 1: unchanged)."""
    ids = np.asarray(region_ids, dtype=np.int64)
    if per_image == 1:
        return ids
    return np.where(ids >= 0, (ids >> ROW_BITS << ROW_BITS) | ((ids & ROW_MASK) // per_image), -1)


def unpack_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) arrays of int64 ``ids``; -1 ids (faiss "no result") give shard -1."""
    ids = np.asarray(ids, dtype=np.int64)
    shard = np.where(ids >= 0, ids >> ROW_BITS, -1)
    row = np.where(ids >= 0, ids & ROW_MASK, -1)
    return shard, row


# ---------------------------------------------------------------------------------------------------------
# The index's calibration (``copyscan calibrate``), kept inside the index output

CALIBRATION_NAME = "calibration.json"


def calibration_url(index: str) -> str:
    return join(index, CALIBRATION_NAME)


def partial_calibration_dir(index: str, seed: int) -> str:
    """Work folder of ``copyscan calibrate partial=N``: ``spec.json``, the pasted ``queries/``, their ``scan/``."""
    return join(index, "calibration", f"partial-seed{seed}")


# ---------------------------------------------------------------------------------------------------------
# A scan run (``copyscan scan --out RUN``) and its report

RUN_CONFIG_NAME = "run.yaml"
SUMMARY_NAME = "summary.json"  # of a scan, and of a memorised-prompt run
MATCHES_DIR = "matches"
CHUNKS_DIR = "chunks"
CHUNK_MARKER_PREFIX = "chunk_"


def matches_dir(run: str) -> str:
    """The parquet dataset of a scan's matches (one part per query chunk)."""
    return join(run, MATCHES_DIR)


def matches_url(run: str, chunk: int) -> str:
    return join(run, MATCHES_DIR, f"part-{chunk:05d}.parquet")


def query_emb_url(run: str, chunk: int) -> str:
    return join(run, "query_emb", f"query_emb_{chunk:05d}.npy")


def query_ids_url(run: str, chunk: int) -> str:
    return join(run, "query_emb", f"query_ids_{chunk:05d}.parquet")


def chunks_dir(run: str) -> str:
    return join(run, CHUNKS_DIR)


def chunk_marker_url(run: str, chunk: int) -> str:
    return join(run, CHUNKS_DIR, f"{CHUNK_MARKER_PREFIX}{chunk:05d}.json")


def summary_url(run: str) -> str:
    return join(run, SUMMARY_NAME)


def report_dir(run: str) -> str:
    """Where ``copyscan report RUN`` writes by default."""
    return join(run, "report")


REPORT_STATS_NAME = "stats.json"
REPORT_HTML_NAME = "report.html"
REPORT_HISTOGRAMS_NAME = "histograms.parquet"
REPORT_SIMILARITIES_NAME = "similarities.parquet"
REPORT_DUPLICATES_NAME = "duplicates.parquet"


# ---------------------------------------------------------------------------------------------------------
# A memorised-prompt run (``copyscan memorized --out MEM``)

MEMORIZED_CONFIG_NAME = "memorized.yaml"
MEMORIZED_PLAN_NAME = "plan.parquet"
MEMORIZED_RESULT_NAME = "memorized.parquet"
TASK_MARKER_PREFIX = "task_"


def memorized_part_url(out: str, task: int) -> str:
    return join(out, "prompts", f"part-{task:05d}.parquet")


def memorized_tasks_dir(out: str) -> str:
    return join(out, "tasks")


def memorized_task_marker_url(out: str, task: int) -> str:
    return join(out, "tasks", f"{TASK_MARKER_PREFIX}{task:05d}.json")


# ---------------------------------------------------------------------------------------------------------
# A generation run (``copyscan generate --out GEN``)

GENERATE_CONFIG_NAME = "generate.yaml"
GENERATE_PLAN_NAME = "plan.parquet"
GENERATE_SCORES_NAME = "prompt_scores.parquet"
SHARD_MARKER_PREFIX = "shard_"


def generate_shards_dir(out: str) -> str:
    """The webdataset shards of a generation run: what ``copyscan scan`` and ``memorized`` read."""
    return join(out, "shards")


def generate_shard_url(out: str, shard: int) -> str:
    return join(out, "shards", f"{shard:05d}.tar")


def generate_markers_dir(out: str) -> str:
    return join(out, "markers")


def generate_marker_url(out: str, shard: int) -> str:
    return join(out, "markers", f"{SHARD_MARKER_PREFIX}{shard:05d}.json")


# ---------------------------------------------------------------------------------------------------------
# Nightly history (``copyscan nightly --history H``)


def checkpoint_name(name: str) -> str:
    """``name`` as a file name of the history, refused when it cannot be one."""
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise CopyscanError(f"checkpoint name {name!r} cannot be a file name")
    return name


def history_dir(history: str) -> str:
    return join(history, "history")


def history_url(history: str, checkpoint: str) -> str:
    return join(history, "history", f"{checkpoint_name(checkpoint)}.parquet")


def history_run_dir(history: str, checkpoint: str) -> str:
    return join(history, "runs", checkpoint_name(checkpoint))


def regression_url(history: str, checkpoint: str) -> str:
    return join(history, "regression", f"{checkpoint_name(checkpoint)}.json")


def history_report_dir(history: str, checkpoint: str) -> str:
    return join(history, "reports", checkpoint_name(checkpoint))


def history_generations_dir(history: str, checkpoint: str) -> str:
    return join(history, "generations", checkpoint_name(checkpoint))


def history_memorized_dir(history: str, checkpoint: str) -> str:
    return join(history, "memorized", checkpoint_name(checkpoint))
