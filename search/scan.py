"""The scan job's resolved setup: what one run of ``copyscan scan`` searches, and how (no Ray here).

``prepare_scan`` reads the index's manifest, plans the query chunks, claims the output (resuming a run:
the chunks with a marker are done), and resolves the search settings, ``is_copy`` threshold, radius, region
windows, verification and partial-copy threshold, logging each, into one frozen ``ScanSetup``. The
per-chunk steps (``search/scan_steps.py``) and the Ray layer (``search/scan_ray.py``) read it; the summary
(``search/scan_summary.py``) describes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from copyscan.indexing.embed.decode import DecodeLimits
from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import to_dict
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.manifest import check_embedder, load_manifest
from copyscan.indexing.store.outputs import claim_output
from copyscan.search.ann.normalise import load_whitening
from copyscan.search.calibrate.thresholds import resolve_partial_threshold, resolve_threshold
from copyscan.search.calibrate.verified import verify_settings
from copyscan.search.regions.windows import LocalWindows, local_windows
from copyscan.search.results.write import finished_chunks
from copyscan.search.scan_chunks import QueryChunk, plan_queries
from copyscan.search.scan_config import ScanConfig
from copyscan.search.verify.dense import DenseSpec, verify_dense
from copyscan.search.verify.matches import MatchVerifier, VerifySpec
from copyscan.search.verify.whole import WholeSpec, verify_whole

logger = logging.getLogger("copyscan")

# (embedder name, weights, options) → the embedder's spec, which the index's manifest must match
EmbedderSpec = Callable[[str, str | None, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ChunkVerifier:
    """What write_chunk runs on a chunk's matches before writing them: dense verification of the region
    candidates, whole-copy verification of the global matches, then pixel verification of the top ranks
    (each None when off). Counts of all go into the chunk marker's ``verify``."""

    pixels: MatchVerifier | None = None
    dense: MatchVerifier | None = None
    whole: MatchVerifier | None = None

    def __call__(self, table: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        stats: dict[str, Any] = {}
        for verifier in (self.dense, self.whole, self.pixels):
            if verifier is not None:
                table, counts = verifier(table)
                stats.update(counts)
        return table, stats


@dataclass(frozen=True)
class ScanSetup:
    """One scan run, resolved: the config, the index, the chunks, and what each step does with them."""

    cfg: ScanConfig
    manifest: dict[str, Any]  # the index's
    chunks: list[QueryChunk]  # every chunk of the queries
    todo: list[QueryChunk]  # the chunks this run scans (the others were finished by an earlier run)
    settings: dict[str, Any]  # re-rank depth, nprobe (and radius) and where each came from
    embedder: str
    weights: str | None
    embedder_options: dict[str, Any]
    threshold: dict[str, Any] | None  # is_copy (resolve_threshold); None: is_copy stays empty
    radius: dict[str, Any] | None  # every match with score_norm >= radius["value"]; None: top k only
    local: LocalWindows | None  # region matching; None: off
    verify: ChunkVerifier | None  # verification before writing; None: off
    partial_threshold: dict[str, Any] | None  # is_partial_copy (resolve_partial_threshold)
    partial_why: str | None  # why is_partial_copy stays empty (None: not asked for, or set)
    # files of the query folder that are not queries, {"file", "reason"} (``QueryListing.skipped``)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def limits(self) -> DecodeLimits:
        """Decode limits of the query images (and of the images verification fetches)."""
        return decode_limits(self.cfg)


def decode_limits(cfg: ScanConfig) -> DecodeLimits:
    return DecodeLimits(cfg.max_image_pixels, cfg.min_image_side, cfg.max_decode_seconds)


def prepare_scan(cfg: ScanConfig, embedder_spec: EmbedderSpec) -> ScanSetup:
    """Resolve a scan run (module docstring); ``embedder_spec`` computes the query embedder's spec (on a Ray
    worker: the driver may lack its weights), checked against the index's."""
    so = cfg.storage_options
    manifest = load_manifest(cfg.index, so)
    chunks, skipped = plan_queries(cfg.queries, cfg.chunk_size, so)
    # the index must be one this scan's vectors can search: refused before the output is claimed
    weights = cfg.weights if cfg.weights is not None else manifest["config"].get("weights")
    options = manifest["config"].get("embedder_options") or {}
    check_embedder(manifest, embedder_spec(manifest["embedder"]["name"], weights, options))
    check_whitening(cfg.index, manifest, so)
    resumed = claim_output(
        cfg.out,
        layout.RUN_CONFIG_NAME,
        to_dict(cfg),
        cfg.mode,
        ScanConfig.RESUME_KEYS,
        so,
        ScanConfig.RESUME_ABSENT,
    )
    done = _finished(cfg, manifest)
    settings = cfg.search_settings(manifest)
    _log_plan(cfg, manifest, len(chunks), len(done), resumed, settings)
    threshold = _threshold(cfg, manifest)
    radius = _radius(cfg, manifest)
    if radius is not None:
        settings["radius"] = {**radius, "max": cfg.radius_max, "margin": cfg.radius_margin}
    local = local_windows(cfg, manifest)
    verify = chunk_verifier(cfg, manifest, local)
    partial_threshold, why = _partial_threshold(cfg, manifest, local)
    if local is not None:
        _log_regions(local)
    return ScanSetup(
        cfg=cfg,
        manifest=manifest,
        chunks=chunks,
        todo=[c for c in chunks if c.chunk not in done],
        settings=settings,
        embedder=manifest["embedder"]["name"],
        weights=weights,
        embedder_options=options,
        threshold=threshold,
        radius=radius,
        local=local,
        verify=verify,
        partial_threshold=partial_threshold,
        partial_why=why,
        skipped=skipped,
    )


def check_whitening(index_url: str, manifest: dict[str, Any], so: storage.StorageOptions | None) -> None:
    """Refuse an index whose whitening file is missing or was fitted on vectors of another dimension than
    its embedder's (a file copied from another index)."""
    spec = manifest.get("whitening")
    if not spec:
        return
    url = storage.join(index_url, spec["path"])
    try:
        params = load_whitening(index_url, manifest, so)
    except FileNotFoundError:
        raise CopyscanError(
            f"{url}: the whitening file the manifest of {index_url} names is missing"
        ) from None
    dim = int(manifest["embedder"]["dim"])
    shapes = {name: tuple(params[name].shape) for name in ("mean", "proj") if name in params}
    if shapes.get("mean", (dim,)) != (dim,) or shapes.get("proj", (dim,))[0] != dim:
        raise CopyscanError(
            f"{url}: whitening of shapes {shapes} does not fit the index's {dim}-dimensional "
            f"{manifest['embedder']['name']} vectors (copied from another index?); rebuild the index"
        )


def _finished(cfg: ScanConfig, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The markers of the chunks already written to ``cfg.out``; they must come from this build of the
    index."""
    done = finished_chunks(cfg.out, cfg.storage_options)
    stale = sorted(c for c, m in done.items() if m.get("index_build_id") != manifest["build_id"])
    if stale:
        raise CopyscanError(
            f"{cfg.out} holds results of {len(stale)} chunk(s) from another build of {cfg.index} "
            f"(index rebuilt since); use mode=overwrite to rescan"
        )
    return done


def _log_plan(
    cfg: ScanConfig, manifest: dict[str, Any], chunks: int, done: int, resumed: bool, settings: dict[str, Any]
) -> None:
    logger.info(
        "scan: %d query chunk(s), %d already done%s; index %s (%s vectors, %s); %d candidates per index "
        "shard (%s), nprobe %s (%s)",
        chunks,
        done,
        " (resumed)" if resumed else "",
        cfg.index,
        f"{manifest['ntotal']:,}",
        manifest["index"]["factory"],
        settings["candidates"],
        settings["candidates_from"],
        settings["nprobe"] or "of the shards",
        settings["nprobe_from"],
    )


def _threshold(cfg: ScanConfig, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What ``is_copy`` means for this index ({"name", "column", "value", "source"}), or None (left empty);
    with whole-copy verification, the calibration's ``verify_score`` thresholds where it made them."""
    verified = (
        verify_settings(WholeSpec(cfg.verify_whole, cfg.verify_whole_weight)) if cfg.verify_whole else None
    )
    threshold = resolve_threshold(manifest, cfg.threshold, verified)
    if (
        verified
        and threshold is not None
        and threshold["column"] != "verify_score"
        and threshold["name"] in ("p90", "p99")
    ):
        logger.warning(
            "scan: is_copy reads score_norm, not verify_score: %s was not calibrated for verify_whole=%d "
            "verify_whole_weight=%g (copyscan calibrate --index %s verify_whole=%d)",
            cfg.index, cfg.verify_whole, cfg.verify_whole_weight, cfg.index, cfg.verify_whole,
        )  # fmt: skip
    if threshold is None and str(cfg.threshold) != "none":
        logger.warning(
            "scan: %s is not calibrated (or was rebuilt since); is_copy stays empty. Run `copyscan calibrate "
            "--index %s`, or pass threshold=somepalli / duplicate / a score_norm value",
            cfg.index,
            cfg.index,
        )
    elif threshold is not None:
        logger.info(
            "scan: is_copy = %s >= %.4f (%s)", threshold["column"], threshold["value"], threshold["source"]
        )
    return threshold


def _radius(cfg: ScanConfig, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What ``radius`` means for this index ({"name", "column", "value", "source"}), or None when off."""
    if str(cfg.radius) == "":
        return None
    radius = resolve_threshold(manifest, cfg.radius)
    if radius is None:
        raise CopyscanError(
            f"radius={cfg.radius}: {cfg.index} is not calibrated (or was rebuilt since); run `copyscan "
            f"calibrate --index {cfg.index}` or give a score_norm value"
        )
    logger.info(
        "scan: every match with score_norm >= %.4f (%s), up to %d more than the top %d per query",
        radius["value"],
        radius["source"],
        cfg.radius_max,
        cfg.k,
    )
    return radius


def _partial_threshold(
    cfg: ScanConfig, manifest: dict[str, Any], local: LocalWindows | None
) -> tuple[dict[str, Any] | None, str | None]:
    """What ``is_partial_copy`` means for this scan, and why it stays empty (resolve_partial_threshold)."""
    partial_threshold, why = resolve_partial_threshold(manifest, cfg, local is not None)
    if partial_threshold is not None:
        logger.info(
            "scan: is_partial_copy = %s >= %.4f on %s 0 (%s)",
            partial_threshold["column"],
            partial_threshold["value"],
            partial_threshold["rank"],
            partial_threshold["source"],
        )
    elif why is not None:  # a warning when asked for by name, else (implied by threshold) a note
        log = logger.warning if str(cfg.partial_threshold) else logger.info
        log("scan: is_partial_copy stays empty: %s", why)
    return partial_threshold, why


def _log_regions(local: LocalWindows) -> None:
    logger.info(
        "scan: partial copies: %d windows per query (%s at %d px) against %s region vectors (%d per image)",
        len(local.spec.boxes),
        "pooled from one pass" if local.spec.mode == "rmac" else "cropped",
        local.spec.size,
        f"{local.manifest['ntotal']:,}",
        len(local.train_boxes),
    )


def chunk_verifier(
    cfg: ScanConfig, manifest: dict[str, Any], local: LocalWindows | None
) -> ChunkVerifier | None:
    """``verify`` for write_chunk: dense verification of the region candidates of local_rank <
    ``dense_verify``, whole-copy verification of the global ranks < ``verify_whole`` and pixel verification
    of the top ``verify_pixels`` ranks; None when all are off."""
    if not cfg.verify_pixels and not cfg.dense_verify and not cfg.verify_whole:
        return None
    if not any(str(e.get("source", "")).endswith(".tar") for e in manifest.get("embedding_shards", [])):
        logger.warning(
            "scan: %s holds no image shards (imported embeddings?); every verification will fail "
            "with train_no_source",
            cfg.index,
        )
    dense = _dense_verifier(cfg, manifest, local) if cfg.dense_verify else None
    pixels = _pixel_verifier(cfg, manifest) if cfg.verify_pixels else None
    whole = _whole_verifier(cfg, manifest) if cfg.verify_whole else None
    return ChunkVerifier(pixels, dense, whole)


def _whole_verifier(cfg: ScanConfig, manifest: dict[str, Any]) -> MatchVerifier:
    spec = WholeSpec(
        ranks=cfg.verify_whole,
        weight=cfg.verify_whole_weight,
        threads=cfg.verify_threads,
        limits=decode_limits(cfg),
    )
    logger.info(
        "scan: whole-copy verification of the top %d matches per query (block-10 maps, the query's at %s "
        "of the training image's); verify_score = score_norm + %g x the peak's margin over the others'",
        spec.ranks,
        ", ".join(f"{f:g}" for f in spec.fractions),
        spec.weight,
    )
    return MatchVerifier(manifest, cfg.index, spec, cfg.storage_options, verify_whole)


def _dense_verifier(cfg: ScanConfig, manifest: dict[str, Any], local: LocalWindows | None) -> MatchVerifier:
    if local is None:
        raise CopyscanError(
            f"dense_verify={cfg.dense_verify} verifies region candidates, but {cfg.index} has no region "
            "index (build it with regions=true) or regions=off"
        )
    spec = DenseSpec(
        ranks=cfg.dense_verify, weight=cfg.dense_weight, threads=cfg.verify_threads, limits=decode_limits(cfg)
    )
    logger.info(
        "scan: dense verification of the best %d region candidates per query (block-10 maps; the "
        "training image's longer side at %s of the query's shorter side); dense_score = "
        "local_score_norm + %g x dense_z",
        spec.ranks,
        ", ".join(f"{f:g}" for f in spec.fractions),
        spec.weight,
    )
    return MatchVerifier(manifest, cfg.index, spec, cfg.storage_options, verify_dense)


def _pixel_verifier(cfg: ScanConfig, manifest: dict[str, Any]) -> MatchVerifier:
    spec = VerifySpec(
        ranks=cfg.verify_pixels,
        size=cfg.verify_size,
        delta=cfg.extraction_delta,
        fit=cfg.verify_fit,
        threads=cfg.verify_threads,
        limits=decode_limits(cfg),
        neighbours=cfg.density_neighbours,
        alpha=cfg.density_alpha,
    )
    logger.info(
        "scan: pixel verification of the top %d match(es) per query at %d px, extracted = tiled l2 < %g",
        spec.ranks,
        spec.size,
        spec.delta,
    )
    if spec.neighbours:
        logger.info(
            "scan: density_l2 = pixel l2 / (%g x mean pixel l2 to the query's top %d matches, fetched too)",
            spec.alpha,
            spec.neighbours,
        )
    return MatchVerifier(manifest, cfg.index, spec, cfg.storage_options)
