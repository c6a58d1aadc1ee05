"""``MemorizedConfig``: every knob of ``copyscan memorized`` (the method and its defaults: ``discover.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copyscan.indexing.index_config import MODES
from copyscan.indexing.runtime.config import key
from copyscan.search.verify.pixel import FITS


@dataclass(frozen=True)
class MemorizedConfig:
    """Every knob of ``copyscan memorized``; YAML file (``--config``) and/or ``key=value``."""

    generations: str = key(help="webdataset shards of generations, or a folder of images with a manifest")
    out: str = key(help="output URL (memorized.parquet, summary.json, memorized.yaml)")
    mode: str = key(
        "resume", "resume: skip finished tasks; overwrite: delete a previous copyscan output first"
    )
    graph_size: int = key(128, "px generations are aligned to for the graph (search/memorized/discover.py)")
    tiles: int = key(4, "tiles per side of the tiled l2 (tiles x tiles)")
    edge_threshold: float = key(0.08, "tiled l2 at graph_size below which two generations are connected")
    min_clique: int = key(10, "flag a prompt whose largest clique has at least this many generations")
    fit: str = key("crop", "crop (short side, centre crop) or squash")
    clique_max_steps: int = key(
        200_000, "exact clique search budget per prompt; past it the clique is a lower bound"
    )
    prompts_per_task: int = key(4, "prompts per Ray task (their images fetched together)")
    task_cpus: float = key(0.5, "CPUs per task")
    max_in_flight: int = key(0, "tasks at once; 0 = 2 x the cluster's CPUs / task_cpus")
    threads: int = key(4, "fetch and decode threads per task")
    max_image_pixels: int = key(64_000_000, "larger generations are rejected before decoding")
    min_image_side: int = key(8, "generations with a smaller side are rejected")
    retries: int = key(2, "extra attempts for a failed task")
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    RESUME_KEYS = (
        "generations",
        "graph_size",
        "tiles",
        "edge_threshold",
        "min_clique",
        "fit",
        "clique_max_steps",
        "prompts_per_task",
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (``copyscan.indexing.runtime.config.resolve`` reports them with bad
        types)."""
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.tiles <= 0 or self.graph_size <= 0 or self.graph_size % self.tiles:
            problems.append(
                f"graph_size ({self.graph_size}) must be a positive multiple of tiles ({self.tiles})"
            )
        if self.edge_threshold <= 0:
            problems.append("edge_threshold must be positive")
        if self.fit not in FITS:
            problems.append(f"fit must be one of {', '.join(FITS)}, not {self.fit!r}")
        for name in ("min_clique", "clique_max_steps", "prompts_per_task", "threads", "max_image_pixels"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.task_cpus <= 0 or self.max_in_flight < 0 or self.retries < 0:
            problems.append("task_cpus must be positive, max_in_flight and retries >= 0")
        return problems
