"""One output shard of a generation run (webdataset tar, then its marker), and the run's per-prompt
scores gathered from the markers.

A shard holds its prompts' generations in plan order, each as ``{key}.jpg`` (the image),
``{key}.json`` and ``{key}.txt`` (the prompt). The JSON carries what ``copyscan scan`` and ``copyscan
memorized`` read (``prompt``) and what a reader needs to redo or judge the generation: ``seed``,
``generation``, ``prompt_index``, ``origin`` and ``train_count`` (captions), the sampling settings,
``checkpoint`` and ``checkpoint_id``, ``memorization_score`` and ``score_per_step``
(``copyscan.search.generate.sampling``). The tar is written whole (temp-then-rename on file systems,
the final name on object storage), then the marker; a shard without its marker is made again on resume,
identically (seeds are fixed by the plan).
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from copyscan.indexing.store import layout, storage
from copyscan.search.generate.prompts import generation_key, generation_seed
from copyscan.search.generate.sampling import Sampler, SampleSettings, dumps, settings_record


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 → JPEG bytes (4:4:4, no subsampling: small generations keep their detail)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical reruns
    tar.addfile(info, io.BytesIO(data))


def generate_shard(
    sampler: Sampler,
    out: str,
    shard: int,
    rows: Sequence[dict[str, Any]],
    run: dict[str, Any],
    storage_options: storage.StorageOptions | None = None,
) -> dict[str, Any]:
    """Generate ``rows`` (plan rows of shard ``shard``), write the tar, then the marker; return the marker.

    ``run``: ``seed``, ``per_prompt``, ``batch_size``, ``jpeg_quality``, ``checkpoint``, ``checkpoint_id``
    and the ``settings`` (``SampleSettings``) shared by every generation.
    """
    t0 = time.perf_counter()
    settings: SampleSettings = run["settings"]
    items = [
        (row, g, generation_seed(run["seed"], row["prompt"], g))
        for row in rows
        for g in range(run["per_prompt"])
    ]
    record = settings_record(settings, sampler)
    buffer = io.BytesIO()
    scores: dict[int, list[float]] = {}
    sample_seconds = 0.0
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for start in range(0, len(items), run["batch_size"]):
            batch = items[start : start + run["batch_size"]]
            t1 = time.perf_counter()
            made = sampler.sample([r["prompt"] for r, _, _ in batch], [s for _, _, s in batch], settings)
            sample_seconds += time.perf_counter() - t1
            for j, (row, g, seed) in enumerate(batch):
                key = generation_key(row["prompt_index"], g)
                score = float(made.scores[j])
                scores.setdefault(row["prompt_index"], []).append(score)
                meta = {
                    "key": key,
                    "prompt": row["prompt"],
                    "prompt_index": row["prompt_index"],
                    "origin": row["origin"],
                    "train_count": row["train_count"],
                    "generation": g,
                    "seed": seed,
                    "checkpoint": run["checkpoint"],
                    "checkpoint_id": run["checkpoint_id"],
                    **record,
                    "memorization_score": score,
                    "score_per_step": [float(x) for x in made.norms[j]],
                }
                _add(tar, f"{key}.jpg", encode_jpeg(made.images[j], run["jpeg_quality"]))
                _add(tar, f"{key}.json", dumps(meta))
                _add(tar, f"{key}.txt", row["prompt"].encode())
    storage.write_bytes(layout.generate_shard_url(out, shard), buffer.getvalue(), storage_options)
    marker = {
        "shard": shard,
        "prompts": len(rows),
        "generations": len(items),
        "bytes": buffer.tell(),
        "seconds": round(time.perf_counter() - t0, 3),
        "sample_seconds": round(sample_seconds, 3),
        "device": sampler.device,
        "prompt_scores": [
            {
                "prompt_index": row["prompt_index"],
                "prompt": row["prompt"],
                "origin": row["origin"],
                "train_count": row["train_count"],
                "scores": scores[row["prompt_index"]],
            }
            for row in rows
        ],
    }
    storage.write_json(layout.generate_marker_url(out, shard), marker, storage_options)
    return marker


def finished_shards(
    out: str, storage_options: storage.StorageOptions | None = None
) -> dict[int, dict[str, Any]]:
    """The markers of the shards already written, by shard."""
    folder = layout.generate_markers_dir(out)
    if not storage.exists(folder, storage_options):
        return {}
    return storage.read_markers(folder, layout.SHARD_MARKER_PREFIX, storage_options)
