"""The index manifest: what an index holds and how it was made; the contract between index and scan.

Paths inside are relative to the index root, so an index can be copied or moved as a whole.
"""

from __future__ import annotations

import importlib.metadata
import time
import uuid
from typing import Any

from copyscan.indexing.build.planner import IndexPlan
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.embedder import spec_fingerprint
from copyscan.indexing.store import layout, storage

FORMAT = "copyscan-index/1"


def _version() -> str:
    try:
        return importlib.metadata.version("copyscan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _rel(out: str, url: str) -> str:
    base = out.rstrip("/") + "/"
    return url[len(base) :] if url.startswith(base) else url


def build_manifest(
    *,
    cfg: dict[str, Any],
    shards: list[str],
    stats: dict[int, dict[str, Any]],
    spec: dict[str, Any],
    plan: IndexPlan,
    markers: dict[int, dict[str, Any]],
    train_info: dict[str, Any],
    timings: dict[str, float],
    started_at: float,
) -> dict[str, Any]:
    """The manifest of the index at ``cfg["out"]``: its embedding shards (``stats``: their stats markers),
    index shards (``markers``: their fill markers), embedder, plan, whitening and background sample."""
    out = cfg["out"]
    embedding_shards = [
        _embedding_shard_entry(out, shard, url, stats[shard]) for shard, url in enumerate(shards)
    ]
    return {
        "format": FORMAT,
        "copyscan_version": _version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # identity of this build (new with every training of the index, kept when a build resumes)
        "build_id": train_info.get("build_id") or uuid.uuid4().hex,
        "wall_seconds": round(time.time() - started_at, 3),
        "embedder": spec,
        "embedder_fingerprint": spec_fingerprint(spec),
        "preprocessing": spec.get("preprocess"),
        "dim": int(spec["dim"]),
        "metric": "inner_product",
        "vectors": {"dtype": "float16", "normalised": "l2", "layout": "clip-retrieval img_emb/metadata"},
        "id_scheme": "shard << 32 | row",
        "ntotal": sum(e["count"] for e in embedding_shards),
        "samples_total": sum(e["samples"] for e in embedding_shards),
        "rejected_total": sum(e["rejected"] for e in embedding_shards),
        "index": _index_entry(out, plan, markers, train_info),
        # Applied to every vector before it is indexed, and to queries and re-ranked vectors at scan time.
        "whitening": _whitening_entry(out, cfg, plan, train_info) if cfg["whitening"] != "none" else None,
        # A sample of the database (whitened), for score normalisation: score_norm = score - beta * mean of the
        # similarities to the 1st..3rd nearest background vectors other than the match itself (METHODS.md §1).
        "background": {
            "vectors": int(train_info["background_vectors"]),
            "path": _rel(out, layout.background_url(out, plan.factory)),
            "ranks": [1, 3],
        },
        "embedding_shards": embedding_shards,
        "index_shards": _index_shard_entries(out, plan, markers, embedding_shards),
        "timings": timings,
        "config": storage.redact_config(cfg),  # never its credentials, whoever built cfg
    }


def _embedding_shard_entry(out: str, shard: int, url: str, s: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says of embedding shard ``shard`` (source ``url``, stats marker ``s``)."""
    return {
        "shard": shard,
        "source": url,
        "count": int(s["count"]),
        "samples": int(s["samples"]),
        "rejected": int(s["rejected"]),
        "rejected_by_reason": s["rejected_by_reason"],
        "id_range": s["id_range"],
        "img_emb": _rel(out, layout.emb_url(out, shard)),
        "metadata": _rel(out, layout.metadata_url(out, shard)),
        "stats": _rel(out, layout.stats_url(out, shard)),
        "pairs": int(s.get("pairs", 0)),  # augmented copies embedded for learned whitening
        "pair_errors": len(s.get("pair_errors", [])),  # images whose copies failed (in the stats)
    }


def _index_shard_entries(
    out: str, plan: IndexPlan, markers: dict[int, dict[str, Any]], embedding_shards: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What the manifest says of every index shard (``markers``: their fill markers), in order."""
    return [
        {
            "index_shard": j,
            "path": _rel(out, layout.index_shard_url(out, plan.factory, j)),
            "ntotal": int(markers[j]["ntotal"]),
            "bytes": int(markers[j]["bytes"]),
            "embedding_shards": markers[j]["embedding_shards"],
            "id_ranges": [embedding_shards[s]["id_range"] for s in markers[j]["embedding_shards"]],
        }
        for j in sorted(markers)
    ]


def _index_entry(
    out: str, plan: IndexPlan, markers: dict[int, dict[str, Any]], train_info: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``index``: the plan, and what every index shard's fill wrote besides its index."""
    return {
        "factory": plan.factory,
        "dir": _rel(out, layout.index_dir(out, plan.factory)),
        "nlist": plan.nlist,
        "pq_m": plan.pq_m,
        "pq_bits": plan.pq_bits,
        "code_bytes_per_vector": plan.code_bytes,
        "ann_bytes_per_vector": plan.ann_bytes,  # code + 8-byte id
        "opq": plan.opq,
        "nprobe": plan.nprobe,
        "candidates": plan.candidates,  # re-rank depth per index shard for the planned recall
        "shard_bytes": plan.shard_bytes,  # estimated ANN memory of the largest index shard
        "train_size": plan.train_size,
        "train_vectors": int(train_info.get("train_vectors", 0)),
        "exact": plan.is_flat,
        # every index shard's fill also wrote its embedding shards' whitening norms (layout.norms_url):
        # scans re-rank raw stored vectors in the whitened space with one dot product each
        "whitened_norms": bool(markers) and all(m.get("norms") for m in markers.values()),
        # a region index: every region vector's density (layout.density_url, build.DENSITY_RANKS)
        "region_density": bool(markers) and all(m.get("density") for m in markers.values()),
        # their mean: a scan subtracts β · (density − mean), so local_score_norm stays centred like
        # score_norm (only a region's excess density counts against it)
        "region_density_mean": (
            sum(m.get("density_sum", 0.0) for m in markers.values())
            / max(1, sum(m.get("density_count", 0) for m in markers.values()))
        ),
    }


def _whitening_entry(
    out: str, cfg: dict[str, Any], plan: IndexPlan, train_info: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``whitening``: how the whitening the training wrote was made."""
    return {
        # "learned" (from pairs of images and their augmented copies), "pca", or "from-index" (a region
        # index: its index's whitening, at whitening_from)
        "kind": train_info.get("whitening_method", cfg["whitening"]),
        "from": train_info.get("whitening_from"),
        "shrinkage": cfg["whitening_shrinkage"],
        "stages": train_info.get("whitening_stages", 1),  # 2: learned, then PCA (pca_shrinkage)
        "pca_shrinkage": cfg.get("whitening_pca_shrinkage"),
        "fit_vectors": int(train_info["whitening_fit_vectors"]),
        "pairs": int(train_info.get("whitening_pairs", 0)),
        "fallback": train_info.get("whitening_fallback"),
        "path": _rel(out, layout.whitening_url(out, plan.factory)),
    }


def load_manifest(index_url: str, storage_options: storage.StorageOptions | None = None) -> dict[str, Any]:
    url = storage.join(index_url, layout.MANIFEST_NAME)
    if not storage.exists(url, storage_options):
        raise CopyscanError(
            f"{index_url} has no {layout.MANIFEST_NAME}: it is not a finished copyscan index "
            "(run or resume `copyscan index` first)"
        )
    manifest = storage.read_json(url, storage_options)
    if manifest.get("format") != FORMAT:
        raise CopyscanError(f"{url} has format {manifest.get('format')!r}; this copyscan reads {FORMAT!r}")
    return manifest


def check_embedder(manifest: dict[str, Any], spec: dict[str, Any]) -> None:
    """Refuse to query an index with vectors from a different embedder or preprocessing."""
    want = manifest["embedder"]
    if spec_fingerprint(spec) == manifest["embedder_fingerprint"]:
        return
    diffs = sorted(k for k in set(want) | set(spec) if want.get(k) != spec.get(k))
    details = "; ".join(f"{k}: index {want.get(k)!r} vs query {spec.get(k)!r}" for k in diffs)
    raise CopyscanError(
        f"the query embedder differs from the one that built the index ({details}); "
        "scan with the index's embedder settings"
    )


def index_embedder(manifest: dict[str, Any], weights: str | None = None, device: str = "auto") -> Any:
    """The embedder the index of ``manifest`` was built with (its weights unless ``weights``, its options),
    loaded on ``device`` and checked against the manifest (``check_embedder``)."""
    from copyscan.indexing.models.embedders import load_embedder

    config = manifest["config"]
    embedder = load_embedder(
        manifest["embedder"]["name"],
        weights if weights is not None else config.get("weights"),
        device,
        config.get("embedder_options") or {},
    )
    check_embedder(manifest, embedder.spec)
    return embedder


def resolve(index_url: str, relative: str) -> str:
    """URL of a manifest path relative to the index root."""
    return storage.join(index_url, relative)
