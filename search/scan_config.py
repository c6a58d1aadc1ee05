"""Configuration of the scan job (``copyscan scan``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from indexing.errors import CopyscanError
from indexing.index_config import MODES
from indexing.models.regions import parse_slide
from indexing.runtime.devices import DEVICES


@dataclass(frozen=True)
class ScanConfig:
    """Every knob of ``copyscan scan``; set with a YAML file (``--config``) and/or ``key=value``."""

    index: str  # URL of a finished copyscan index (its manifest.json)
    queries: str  # folder of images (query_id = file name) or webdataset shards (query_id = __key__)
    out: str  # output URL
    mode: str = "resume"

    k: int = 10  # results per query
    # ANN candidates per index shard, re-ranked exactly; 0 = the index's planned re-rank depth (manifest
    # index.candidates, from its recall_target), else max(10·k, 100)
    candidates: int = 0
    nprobe: int = 0  # 0 = the index's planned nprobe (manifest index.nprobe)
    chunk_size: int = 1024  # queries per chunk (image folders; a query shard is one chunk)
    beta: float = 1.0  # score normalisation: score_norm = score - beta * background bias
    # is_copy = the match passes this threshold: p90 / p99 (the index's calibration, copyscan calibrate),
    # somepalli (score_raw >= 0.5), duplicate (score_raw >= 0.95), a score_norm value, or none
    threshold: str | float = "p90"
    # is_partial_copy = a query's partial answer (dense_rank 0 with dense_verify, else local_rank 0) passes
    # this: p90 / p99 (copyscan calibrate partial=N, for scans with the same partial settings), a value of
    # the answer's score (dense_score, else local_score_norm), or none; "" = p90 / p99 when threshold is,
    # else none (search/calibrate/partial.py)
    partial_threshold: str | float = ""
    # Every match above a threshold, not only the top k (search/ann/radius.py): each query's k best plus every
    # further training image with score_norm >= radius, at most radius_max more per query (a training
    # image duplicated 500 times shows up 500 times): p90 / p99 (copyscan calibrate) or a score_norm
    # value. A range search with the score normalisation folded into the query; approximate scores down
    # to radius_margin below a query's floor are re-ranked exactly. "" = off (top k only)
    radius: str | float = ""
    radius_max: int = 1000
    radius_margin: float = 0.1

    # Pixel verification (Carlini et al.): the top ``verify_pixels`` matches of every query are re-fetched
    # (training image from its shard, generation from its source), aligned to verify_size px, and get
    # pixel_l2, tiled_l2 and extracted = tiled_l2 < extraction_delta; 0 = off. search/verify/matches.py
    verify_pixels: int = 0
    extraction_delta: float = 0.15
    verify_size: int = 512  # both images: short side resized to this, centre crop (verify_fit=crop) or squash
    verify_fit: str = "crop"
    verify_threads: int = 8  # fetch and decode threads per verification task
    # Each chunk is verified, then written, by a Ray task of verify_cpus CPUs, overlapping the scan; at most
    # verify_in_flight such tasks at once (0 = 2 x cluster CPUs / verify_cpus), beyond which the scan waits
    verify_cpus: float = 0.5
    verify_in_flight: int = 0
    # Density-relative score (Carlini et al., for unconditional models): density_l2 = pixel_l2 /
    # (density_alpha x mean pixel_l2 of the generation to its top density_neighbours matches, which are
    # fetched and compared too; needs k >= density_neighbours and verify_pixels >= 1); < 1 = extracted.
    # 0 = off; the paper uses 50
    density_neighbours: int = 0
    density_alpha: float = 0.5

    # Partial copies (search/regions/): search the index's region index with windows of every query.
    # "auto": when the index has one (copyscan index regions=true); "on": fail without one; "off".
    regions: str = "auto"
    region_query_grid: str = ""  # windows (indexing/models/regions.py grid spec); "" = the index's
    region_query_size: int = 0  # px the query is preprocessed at before cropping windows; 0 = the index's
    region_hits: int = 20  # region hits per window, exactly re-ranked, before aggregating per training image
    # region hits rank by cosine − region_density_beta · (the training region's density − the index's mean
    # density); density = its mean cosine to its 3 nearest background regions of other images, stored by
    # the index: generic regions (sky, texture) are near every window and would otherwise crowd out real
    # matches. 0 = off
    region_density_beta: float = 1.0
    # Localise, then search: the frames (where the whole training image lies in the query, from its best
    # window/region pairs) of the best region_refine images are cut from the query, embedded like images and
    # searched in the global index; a pasted object cut out that way matches its source like a whole copy.
    # Costs up to region_refine forward passes and global searches per query. 0 = off
    region_refine: int = 5
    # Sliding windows, searched in the global index like the frames: squares of these sides (fractions of
    # the query's shorter side; search/regions/geometry.py slide_boxes), a third of a side apart, e.g. "0.5,0.4":
    # 52 windows on a square query, 88 on a 3:2 one (forward passes and global searches); "WxH" entries
    # are rectangles: "0.5,0.4,0.45x0.3,0.3x0.45" is 132 windows on a square query, 212 on a 3:2 one. They
    # put the source among the best 10 images for more pasted copies (98 instead of 91 of 120 with the
    # squares) but add as many false matches: recall@1 0.617 against 0.633 without, for 1.5x the scan time
    # (README); dense_verify then ranks those candidates. "" = off
    region_slide: str = ""
    # Somepalli et al.'s split product, position-aligned, each chunk normalised (a cosine): for every match,
    # split_score = max over the index's region boxes r of cos(query box r, training box r), in the region
    # index's space (needs a region index; query boxes made like the index's, indexing/models/regions.py)
    split_product: bool = False
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
    dense_verify: int = 0
    dense_weight: float = 0.05

    weights: str | None = None  # query embedder weights; None = the ones the index was built with
    batch_size: int = 64
    max_image_pixels: int = 64_000_000
    min_image_side: int = 8
    # 0 = one per alive GPU, or per 4 alive CPUs on a CPU-only cluster, growing as nodes join, at most one per
    # query chunk; N = N actors
    embed_actors: int = 0
    embed_actor_cpus: float = 0.5
    # -1 = 1 if the cluster has GPUs or its autoscaler can start a GPU node, else 0 (CPU actors)
    embed_actor_gpus: float = -1.0
    max_gpus: float = 0  # GPUs the embedding actors may hold in all; 0 = no limit
    actor_start_timeout: float = 900.0  # seconds a pool waits for its first actor to start (node boots)
    embed_concurrency: int = 2
    decode_cpus: float = 0.5
    torch_threads: int = 0

    scan_actors: int = 0  # 0 = min(index shards, CPUs / 2)
    scan_actor_cpus: float = 0.5
    # GPUs per scan actor (0: CPU actors). An actor holding one finds each query block's nearest inverted
    # lists there (search/ann/coarse.py: nq x nlist dot products, most of a query's FLOPs at LAION's
    # nlist); the lists themselves are scanned on the CPU, from the memory-mapped shards
    scan_actor_gpus: float = 0.0
    # what runs the coarse assignment: auto (faiss-gpu, else torch on the actor's CUDA device, else the
    # CPU), cpu, faiss-gpu, torch (indexing/runtime/devices.py)
    search_device: str = "auto"
    cache_dir: str = ""  # local cache for index shards and vectors; "" = $COPYSCAN_CACHE or ~/.cache/copyscan
    retries: int = 2
    storage_options: dict[str, Any] = field(default_factory=dict)

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
        "region_hits",
        "region_density_beta",
        "region_refine",
        "region_slide",
        "split_product",
        "dense_verify",
        "dense_weight",
    )
    # what a run recorded before these settings existed did (claim_output's ``absent``): no crops
    RESUME_ABSENT = {
        "region_refine": 0,
        "region_slide": "",
        "dense_verify": 0,
        "dense_weight": 0.05,
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

    def validate(self) -> None:
        problems = (
            self._search_problems()
            + self._threshold_problems()
            + self._verify_problems()
            + self._region_problems()
        )
        if problems:
            raise CopyscanError("invalid scan config: " + "; ".join(problems))

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
            "embed_concurrency",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.candidates and self.candidates < self.k:
            problems.append(f"candidates ({self.candidates}) must be >= k ({self.k})")
        if self.nprobe < 0 or self.scan_actors < 0 or self.embed_actors < 0 or self.retries < 0:
            problems.append("nprobe, scan_actors, embed_actors and retries must be >= 0")
        if self.scan_actor_gpus < 0:
            problems.append("scan_actor_gpus must be >= 0")
        if self.search_device not in DEVICES:
            problems.append(f"search_device must be one of {', '.join(DEVICES)}, not {self.search_device!r}")
        return problems

    def _threshold_problems(self) -> list[str]:
        """``radius`` and ``partial_threshold``."""
        problems = []
        if str(self.radius) != "":
            if str(self.radius) in ("none", "somepalli", "duplicate"):
                problems.append(
                    f"radius is a score_norm threshold (p90, p99 or a value), not {self.radius!r}: the "
                    "index is range-searched in its own space, where score_raw thresholds do not apply"
                )
            elif str(self.radius) not in ("p90", "p99"):
                try:
                    float(self.radius)
                except ValueError:
                    problems.append(f"radius must be p90, p99 or a score_norm value, not {self.radius!r}")
            if self.radius_max <= 0 or self.radius_margin < 0:
                problems.append("radius_max must be positive and radius_margin >= 0")
            if self.beta < 0:
                problems.append("radius needs beta >= 0 (its range search bounds beta x background bias)")
        if str(self.partial_threshold) not in ("", "none", "p90", "p99"):
            try:
                float(self.partial_threshold)
            except ValueError:
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
        if self.region_density_beta < 0:
            problems.append("region_density_beta must be >= 0")
        if self.dense_verify < 0 or self.dense_weight < 0:
            problems.append("dense_verify and dense_weight must be >= 0")
        elif self.dense_verify and self.regions == "off":
            problems.append("dense_verify verifies region candidates: it needs regions on (or auto)")
        if self.region_hits <= 0 or self.region_query_size < 0:
            problems.append("region_hits must be positive and region_query_size >= 0")
        if self.region_refine < 0:
            problems.append("region_refine must be >= 0 (0 = off)")
        try:
            parse_slide(self.region_slide)
        except CopyscanError as exc:
            problems.append(str(exc))
        return problems
