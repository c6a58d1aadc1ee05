"""Configuration of the scan job (``copyscan scan``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.index_config import MODES
from copyscan.indexing.models.regions import HYBRID_CROPS, QUERY_MODES, parse_slide
from copyscan.indexing.runtime.config import key
from copyscan.indexing.runtime.devices import DEVICES
from copyscan.search.calibrate.thresholds import NAMED_THRESHOLDS


@dataclass(frozen=True)
class ScanConfig:
    """Every knob of ``copyscan scan``; set with a YAML file (``--config``) and/or ``key=value``."""

    index: str = key(help="URL of a finished copyscan index (its manifest.json)")
    queries: str = key(
        help="folder of images (query_id = path in it) or webdataset shards (query_id = __key__)"
    )
    out: str = key(help="output URL of the scan (matches/, summary.json, run.yaml)")
    mode: str = key(
        "resume", "resume: skip finished chunks; overwrite: delete a previous copyscan output first"
    )

    k: int = key(10, "results per query")
    # ANN candidates per index shard, re-ranked exactly; 0 = the index's planned re-rank depth (manifest
    # index.candidates, from its recall_target), else max(10·k, 100)
    candidates: int = key(
        0, "ANN candidates per index shard, re-ranked exactly; 0 = the index's planned depth"
    )
    nprobe: int = key(0, "inverted lists searched per query; 0 = the index's planned nprobe")
    chunk_size: int = key(1024, "queries per chunk (image folders; a query shard is one chunk)")
    beta: float = key(1.0, "score normalisation: score_norm = score - beta x background bias")
    # is_copy = the match passes this threshold: p90 / p99 (the index's calibration, copyscan calibrate),
    # somepalli (score_raw >= 0.5), duplicate (score_raw >= 0.95), a score_norm value, or none
    threshold: str | float = key(
        "p90", "is_copy: p90 / p99 (calibrated), somepalli, duplicate, a score_norm value, or none"
    )
    # is_partial_copy = a query's partial answer (dense_rank 0 with dense_verify, else local_rank 0) passes
    # this: p90 / p99 (copyscan calibrate partial=N, for scans with the same partial settings), a value of
    # the answer's score (dense_score, else local_score_norm), or none; "" = p90 / p99 when threshold is,
    # else none (search/calibrate/partial.py)
    partial_threshold: str | float = key(
        "", 'is_partial_copy: p90 / p99, a value of the answer\'s score, none; "" = as threshold'
    )
    # Every match above a threshold, not only the top k (search/ann/radius.py): each query's k best plus every
    # further training image with score_norm >= radius, at most radius_max more per query (a training
    # image duplicated 500 times shows up 500 times): p90 / p99 (copyscan calibrate) or a score_norm
    # value. A range search with the score normalisation folded into the query; approximate scores down
    # to radius_margin below a query's floor are re-ranked exactly. "" = off (top k only)
    radius: str | float = key(
        "", 'also every match with score_norm >= this: p90, p99 or a value; "" = top k only'
    )
    radius_max: int = key(1000, "matches kept per query beyond the top k at most (radius)")
    radius_margin: float = key(
        0.1, "approximate scores this far below a query's radius floor are re-ranked exactly"
    )

    # Pixel verification (Carlini et al.): the top ``verify_pixels`` matches of every query are re-fetched
    # (training image from its shard, generation from its source), aligned to verify_size px, and get
    # pixel_l2, tiled_l2 and extracted = tiled_l2 < extraction_delta; 0 = off. search/verify/matches.py
    verify_pixels: int = key(
        0, "top matches per query re-fetched and compared in pixels (pixel_l2, tiled_l2); 0 = off"
    )
    extraction_delta: float = key(0.15, "extracted = tiled_l2 below this")
    verify_size: int = key(512, "px both images are aligned to for pixel verification (short side)")
    verify_fit: str = key("crop", "crop (short side, centre crop) or squash")
    verify_threads: int = key(8, "fetch and decode threads per verification task")
    # Each chunk is verified, then written, by a Ray task of verify_cpus CPUs, overlapping the scan; at most
    # verify_in_flight such tasks at once (0 = 2 x cluster CPUs / verify_cpus), beyond which the scan waits
    verify_cpus: float = key(0.5, "CPUs per verification task (one per chunk)")
    verify_in_flight: int = key(0, "verification tasks at once; 0 = 2 x cluster CPUs / verify_cpus")
    # Density-relative score (Carlini et al., for unconditional models): density_l2 = pixel_l2 /
    # (density_alpha x mean pixel_l2 of the generation to its top density_neighbours matches, which are
    # fetched and compared too; needs k >= density_neighbours and verify_pixels >= 1); < 1 = extracted.
    # 0 = off; the paper uses 50
    density_neighbours: int = key(
        0, "density_l2: pixel_l2 relative to the top N matches' (Carlini et al.: 50); 0 = off"
    )
    density_alpha: float = key(
        0.5, "density_l2 = pixel_l2 / (density_alpha x mean pixel_l2 to the neighbours)"
    )

    # Partial copies (search/regions/): search the index's region index with windows of every query.
    # "auto": when the index has one (copyscan index regions=true); "on": fail without one; "off".
    regions: str = key("auto", "search the region index: auto (when the index has one), on (required) or off")
    region_query_grid: str = key("", 'windows cut from each query (grid spec); "" = the index\'s')
    region_query_size: int = key(
        0, "px the query is preprocessed at for its windows; 0 = the index's (crop), 672 (pool), 576 (hybrid)"
    )
    # How the windows are embedded (indexing/models/regions.py RegionSpec): "crop" cuts each window out and
    # embeds it alone, one forward pass per window (195 by default); "pool" pools all of them from the
    # feature maps of one forward pass over the query at region_query_size px (672 by default; R-MAC-style
    # regional pooling, effnet-lite0 only, other embedders crop). The frames (region_refine) and sliding
    # windows are crops either way. Measured side by side on the partial-copy bench (README "Partial
    # copies (regions)"): pool scanned 6.3-7.0x more generations per second at recall@1 0.56 / 0.56 / 0.58
    # against 0.63 / 0.69 / 0.60 (seeds 1-3) and lower AP, short of the 10x at equal recall asked for a
    # default, so crop stays the default. "hybrid" pools them at 576 px and crops the best 8 again
    # (LocalWindows.recrop): on held-out seeds 4-7, 4.8-5.3x crop's generations/s (10.3-12.0x the code
    # issue 24 was filed on) but 103 of 160 copies found against crop's 113 (README "Before and after,
    # side by side"): not the default.
    region_query_mode: str = key(
        "crop",
        "query windows: crop (a pass each), pool (one pass; effnet-lite0) or hybrid (pooled, the best few cropped)",
    )
    # hybrid: each query's windows whose pooled vectors found the best normalised hits, cut out and embedded
    # again (a forward pass and a region search each); their hits replace the pooled ones. Seeds 4-7: 8 / 16
    # / 24 found 103 / 106 / 109 of 160 copies (crop: 113) at 2.9 / 2.4 / 2.2 generations/s (crop: 0.6)
    region_recrop: int = key(
        HYBRID_CROPS, "region_query_mode=hybrid: pooled windows per query cut out and embedded again"
    )
    region_hits: int = key(
        20, "region hits per window, exactly re-ranked, before aggregating per training image"
    )
    # region hits rank by cosine − region_density_beta · (the training region's density − the index's mean
    # density); density = its mean cosine to its 3 nearest background regions of other images, stored by
    # the index: generic regions (sky, texture) are near every window and would otherwise crowd out real
    # matches. 0 = off
    region_density_beta: float = key(
        1.0, "region hits lose this x their region's density (generic regions); 0 = off"
    )
    # Localise, then search: the frames (where the whole training image lies in the query, from its best
    # window/region pairs) of the best region_refine images are cut from the query, embedded like images and
    # searched in the global index; a pasted object cut out that way matches its source like a whole copy.
    # Costs up to region_refine forward passes and global searches per query. 0 = off
    region_refine: int = key(
        5, "frames of the best N region images cut from the query and searched globally; 0 = off"
    )
    # Sliding windows, searched in the global index like the frames: squares of these sides (fractions of
    # the query's shorter side; search/regions/geometry.py slide_boxes), a third of a side apart, e.g. "0.5,0.4":
    # 52 windows on a square query, 88 on a 3:2 one (forward passes and global searches); "WxH" entries
    # are rectangles: "0.5,0.4,0.45x0.3,0.3x0.45" is 132 windows on a square query, 212 on a 3:2 one. They
    # put the source among the best 10 images for more pasted copies (98 instead of 91 of 120 with the
    # squares) but add as many false matches: recall@1 0.617 against 0.633 without, for 1.5x the scan time
    # (README); dense_verify then ranks those candidates. "" = off
    region_slide: str = key(
        "", 'sliding windows searched globally: sides (or WxH) as fractions, e.g. "0.5,0.4"; "" = off'
    )
    # Somepalli et al.'s split product, position-aligned, each chunk normalised (a cosine): for every match,
    # split_score = max over the index's region boxes r of cos(query box r, training box r), in the region
    # index's space (needs a region index; query boxes made like the index's, indexing/models/regions.py)
    split_product: bool = key(
        False, "split_score: Somepalli et al.'s split product over the region boxes (needs regions)"
    )
    # Dense verification (search/verify/dense.py): the region candidates of local_rank < dense_verify are re-fetched
    # (training image from its shard, generation from its source), and the training image is searched in
    # the generation over offset and scale, cell by cell on EfficientNet-Lite0's block-10 feature maps:
    # dense_z (how far its best placement stands out), dense_box (where) and dense_score = local_score_norm
    # + dense_weight * dense_z (the confidence); dense_rank orders a query's candidates by dense_z. Runs in
    # the verification tasks (verify_cpus each, like verify_pixels); costs 7 forward passes per query and
    # one per candidate. Needs a region index. 0 = off. Measured with region_refine=10
    # region_slide=0.5,0.4,0.45x0.3,0.3x0.45 dense_verify=10 on held-out pasted copies: recall@1 0.850
    # (dense_rank 0) and AP 0.822 (its dense_score) against 0.750 and 0.674 by local_score_norm, at 0.06
    # queries/s on a 2-core CPU against 0.17 with the defaults (README). Not for whole copies (they fit no
    # level of the generation's pyramid): read those from the global columns
    dense_verify: int = key(
        0, "region candidates per query re-fetched and located densely (dense_z, dense_score); 0 = off"
    )
    dense_weight: float = key(0.05, "dense_score = local_score_norm + dense_weight x dense_z")
    # Whole-copy verification (search/verify/whole.py): the global matches of rank < verify_whole are
    # re-fetched and the generation's block-10 map is slid over each training image's at 55-95 % of its
    # size: verify_peak, verify_score = score_norm + verify_whole_weight x (verify_peak - the mean of the 3
    # highest peaks of the generation's other matches), verify_rank (0 = the answer). Runs in the
    # verification tasks; one forward pass per query and one per match. Opt-in for its cost (README
    # "Evaluation": AP up on every domain; 1.2-2.1 s per query on one CPU thread, 20-50x its embedding). 0 = off
    verify_whole: int = key(
        0, "global matches per query re-fetched and re-ranked by dense matching (verify_score); 0 = off"
    )
    verify_whole_weight: float = key(2.0, "verify_score = score_norm + this x the peak's margin")

    weights: str | None = key(None, "query embedder weights; null = the ones the index was built with")
    batch_size: int = key(64, "images per forward pass")
    max_image_pixels: int = key(64_000_000, "larger queries are rejected (too_large) before decoding")
    min_image_side: int = key(8, "queries with a smaller side are rejected (too_small)")
    max_decode_seconds: float = key(
        20.0, "a query taking longer to open and decode is rejected (decode_timeout)"
    )
    jpeg_draft: bool = key(
        True,
        "JPEG queries decoded at the smallest DCT scale (1/2, 1/4, 1/8) still covering the model's input",
    )
    # 0 = one per alive GPU, or per 4 alive CPUs on a CPU-only cluster, growing as nodes join, at most one per
    # query chunk; N = N actors
    embed_actors: int = key(
        0, "embedding actors; 0 = one per alive GPU (or per 4 CPUs), growing as nodes join"
    )
    embed_actor_cpus: float = key(0.5, "CPUs per embedding actor")
    # -1 = 1 if the cluster has GPUs or its autoscaler can start a GPU node, else 0 (CPU actors)
    embed_actor_gpus: float = key(
        -1.0, "GPUs per embedding actor; -1 = 1 when the cluster has or can start GPUs, else 0"
    )
    max_gpus: float = key(0.0, "GPUs the embedding actors may hold in all; 0 = no limit")
    actor_start_timeout: float = key(
        900.0, "seconds a pool waits for its first actor to start (a node booting)"
    )
    # 0 = from the measured cost an image of a decode task and of the model, as the index job
    # (indexing/embed/fanout.py): 2 on a CPU actor, tens on a GPU one
    embed_concurrency: int = key(
        0, "query pieces in flight (decode tasks) per embedding actor; 0 = from the measured rates"
    )
    stage_threads: int = key(
        0,
        "chunks searched and written at once (driver threads); 0 = pieces in flight x embedding actors",
    )
    decode_cpus: float = key(0.5, "CPUs per decode task")
    torch_threads: int = key(
        0,
        "torch threads per embedding actor; 0: a CPU actor's model, one batch at a time, on min(4, CPUs)",
    )

    scan_actors: int = key(0, "scan actors (each holds index shards); 0 = min(index shards, CPUs / 2)")
    scan_actor_cpus: float = key(0.5, "CPUs per scan actor")
    # GPUs per scan actor (0: CPU actors). An actor holding one finds each query block's nearest inverted
    # lists there (search/ann/coarse.py: nq x nlist dot products, most of a query's FLOPs at LAION's
    # nlist); the lists themselves are scanned on the CPU, from the memory-mapped shards
    scan_actor_gpus: float = key(
        0.0, "GPUs per scan actor (its coarse assignment runs there); 0 = CPU actors"
    )
    # what runs the coarse assignment: auto (faiss-gpu, else torch on the actor's CUDA device, else the
    # CPU), cpu, faiss-gpu, torch (indexing/runtime/devices.py)
    search_device: str = key("auto", "what runs the coarse assignment: auto, cpu, faiss-gpu or torch")
    cache_dir: str = key(
        "", 'local cache of index shards and vectors; "" = $COPYSCAN_CACHE or ~/.cache/copyscan'
    )
    retries: int = key(2, "extra attempts for a failed chunk")
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    RESUME_KEYS = (
        "index",
        "queries",
        "k",
        "candidates",
        "nprobe",
        "chunk_size",
        "weights",
        "beta",
        "threshold",
        "partial_threshold",
        "radius",
        "radius_max",
        "radius_margin",
        "verify_pixels",
        "extraction_delta",
        "verify_size",
        "verify_fit",
        "density_neighbours",
        "density_alpha",
        "regions",
        "region_query_grid",
        "region_query_size",
        "region_query_mode",
        "region_recrop",
        "region_hits",
        "region_density_beta",
        "region_refine",
        "region_slide",
        "split_product",
        "dense_verify",
        "dense_weight",
        "verify_whole",
        "verify_whole_weight",
    )
    # what a run recorded before these settings existed did (claim_output's ``absent``): no crops
    RESUME_ABSENT = {
        "region_query_mode": "crop",
        "region_recrop": HYBRID_CROPS,
        "region_refine": 0,
        "region_slide": "",
        "dense_verify": 0,
        "dense_weight": 0.05,
        "verify_whole": 0,
        "verify_whole_weight": 2.0,
        "partial_threshold": "",
        "radius": "",
        "radius_max": 1000,
        "radius_margin": 0.1,
    }

    def search_settings(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Re-rank depth and nprobe of a scan of the index described by ``manifest``, and where each
        comes from: this config when set, else the index's plan (the planner's recall target), else the
        default. ``{"candidates", "candidates_from", "nprobe", "nprobe_from"}``."""
        planned = manifest.get("index", {})
        target = (manifest.get("config") or {}).get("recall_target")
        plan = f"index plan (recall_target {target})" if target is not None else "index plan"
        if self.candidates:
            candidates, candidates_from = self.candidates, "config"
        elif int(planned.get("candidates") or 0) >= self.k:
            candidates, candidates_from = int(planned["candidates"]), plan
        elif int(planned.get("candidates") or 0):  # planned for top-10: never fewer than k
            candidates, candidates_from = self.k, f"{plan}, raised to k"
        else:  # exact indexes and manifests from before the plan recorded it
            candidates, candidates_from = max(10 * self.k, 100), "default"
        if self.nprobe:
            nprobe, nprobe_from = self.nprobe, "config"
        elif int(planned.get("nprobe") or 0):
            nprobe, nprobe_from = int(planned["nprobe"]), plan
        else:
            nprobe, nprobe_from = 0, "index shards (exact index)" if planned.get("exact") else "index shards"
        return {
            "candidates": candidates,
            "candidates_from": candidates_from,
            "nprobe": nprobe,
            "nprobe_from": nprobe_from,
        }

    def problems(self) -> list[str]:
        """Every problem of these settings that shows without the index
        (``copyscan.indexing.runtime.config.resolve``)."""
        return (
            self._search_problems()
            + self._threshold_problems()
            + self._verify_problems()
            + self._region_problems()
        )

    def _search_problems(self) -> list[str]:
        """Mode, sizes, re-ranking depth and pools."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in (
            "k",
            "chunk_size",
            "batch_size",
            "max_image_pixels",
            "min_image_side",
            "max_decode_seconds",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.candidates and self.candidates < self.k:
            problems.append(f"candidates ({self.candidates}) must be >= k ({self.k})")
        if min(self.nprobe, self.scan_actors, self.embed_actors, self.retries, self.stage_threads) < 0:
            problems.append("nprobe, scan_actors, embed_actors, retries and stage_threads must be >= 0")
        if self.embed_concurrency < 0:
            problems.append("embed_concurrency must be >= 0 (0 = from the measured rates)")
        if self.scan_actor_gpus < 0:
            problems.append("scan_actor_gpus must be >= 0")
        if self.search_device not in DEVICES:
            problems.append(f"search_device must be one of {', '.join(DEVICES)}, not {self.search_device!r}")
        return problems

    def _threshold_problems(self) -> list[str]:
        """``threshold``, ``radius`` and ``partial_threshold``: names, or numbers (``resolve`` reads a number
        as a float); whether the index has the calibration p90 / p99 name shows only once it is loaded."""
        problems = []
        if not _named_or_number(self.threshold, ("p90", "p99", *NAMED_THRESHOLDS, "none")):
            problems.append(
                f"threshold must be p90, p99, somepalli, duplicate, none or a score_norm value, "
                f"not {self.threshold!r}"
            )
        if self.radius != "":
            if self.radius in ("none", *NAMED_THRESHOLDS):
                problems.append(
                    f"radius is a score_norm threshold (p90, p99 or a value), not {self.radius!r}: the "
                    "index is range-searched in its own space, where score_raw thresholds do not apply"
                )
            elif not _named_or_number(self.radius, ("p90", "p99")):
                problems.append(f"radius must be p90, p99 or a score_norm value, not {self.radius!r}")
            if self.radius_max <= 0 or self.radius_margin < 0:
                problems.append("radius_max must be positive and radius_margin >= 0")
            if self.beta < 0:
                problems.append("radius needs beta >= 0 (its range search bounds beta x background bias)")
        if not _named_or_number(self.partial_threshold, ("", "none", "p90", "p99")):
            problems.append(
                f"partial_threshold must be p90, p99, none or a value of the partial answer's score, "
                f"not {self.partial_threshold!r}"
            )
        return problems

    def _verify_problems(self) -> list[str]:
        """Pixel verification and its density normalisation."""
        problems = []
        if not 0 <= self.verify_pixels <= self.k:
            problems.append(
                f"verify_pixels must be between 0 (off) and k ({self.k}), not {self.verify_pixels}"
            )
        if self.verify_size <= 0 or self.verify_size % 4:
            problems.append(
                f"verify_size must be a positive multiple of 4 (4 x 4 tiles), not {self.verify_size}"
            )
        if self.extraction_delta <= 0:
            problems.append("extraction_delta must be positive")
        if self.verify_fit not in ("crop", "squash"):
            problems.append(f"verify_fit must be crop or squash, not {self.verify_fit!r}")
        if self.verify_threads <= 0:
            problems.append("verify_threads must be positive")
        if self.verify_cpus <= 0 or self.verify_in_flight < 0:
            problems.append("verify_cpus must be positive and verify_in_flight >= 0")
        if not (self.verify_whole == 0 or 2 <= self.verify_whole <= self.k) or self.verify_whole_weight <= 0:
            problems.append(
                f"verify_whole must be 0 (off) or between 2 and k ({self.k}), not {self.verify_whole}, "
                "and verify_whole_weight positive"
            )
        if self.density_neighbours < 0 or self.density_alpha <= 0:
            problems.append("density_neighbours must be >= 0 and density_alpha positive")
        elif self.density_neighbours > self.k:
            problems.append(
                f"density_neighbours ({self.density_neighbours}) are the query's top matches, but the scan "
                f"keeps only k = {self.k} per query: set k >= {self.density_neighbours}"
            )
        elif self.density_neighbours and not self.verify_pixels:
            problems.append("density_neighbours scores verified matches: set verify_pixels >= 1")
        return problems

    def _region_problems(self) -> list[str]:
        """Partial copies: region search, refinement, sliding windows, dense verification."""
        problems = []
        if self.regions not in ("auto", "on", "off"):
            problems.append(f"regions must be auto, on or off, not {self.regions!r}")
        if self.region_query_mode not in QUERY_MODES:
            problems.append(f"region_query_mode must be crop, pool or hybrid, not {self.region_query_mode!r}")
        if self.region_density_beta < 0:
            problems.append("region_density_beta must be >= 0")
        if self.dense_verify < 0 or self.dense_weight < 0:
            problems.append("dense_verify and dense_weight must be >= 0")
        elif self.dense_verify and self.regions == "off":
            problems.append("dense_verify verifies region candidates: it needs regions on (or auto)")
        if self.region_recrop < 0:
            problems.append("region_recrop must be >= 0")
        if self.region_hits <= 0 or self.region_query_size < 0:
            problems.append("region_hits must be positive and region_query_size >= 0")
        if self.region_refine < 0:
            problems.append("region_refine must be >= 0 (0 = off)")
        try:
            parse_slide(self.region_slide)
        except CopyscanError as exc:
            problems.append(str(exc))
        return problems


def _named_or_number(value: str | float, names: tuple[str, ...]) -> bool:
    """``value`` is one of ``names`` or a finite number (not a bool)."""
    if isinstance(value, str):
        return value in names
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
