"""``ReportConfig``: every knob of ``copyscan report``, validated up front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copyscan.indexing.runtime.config import key
from copyscan.indexing.store import layout

COLUMNS = ("score", "score_raw", "score_norm")  # the score columns the report describes


@dataclass(frozen=True)
class ReportConfig:
    """Every knob of ``copyscan report``; set with a YAML file (``--config``) and/or ``key=value``."""

    run: str = key(help="URL of a finished scan output")
    out: str = key("", 'output URL of the report; "" = RUN/report')
    index: str = key("", 'URL of the index; "" = the index the run scanned (its run.yaml)')
    column: str = key("", 'score column the HTML leads with; "" = the run\'s threshold column, else score')
    thresholds: tuple[float, ...] = key(
        (0.5,), "the report gives the fraction of scores >= each of these values, for every score column"
    )
    train_sample: int = key(2_000, "training images searched for the train→train distribution")
    seed: int = key(0, "random seed (train sample, random duplicates baseline, bootstrap)")
    resamples: int = key(1_000, "bootstrap resamples of the mean shift (fractions use Wilson intervals)")
    duplicate_radius: float = key(0.95, "near-duplicate: score (the index's space) >= this")
    duplicate_margin: float = key(0.1, "range search radius = duplicate_radius - this, then exact re-scoring")
    duplicate_images: int = key(1_000, "matched training images counted at most (highest-scoring first)")
    duplicate_random: int = key(1_000, "random training images counted, the baseline")
    gallery: int = key(10_000, "best matches listed in the HTML gallery")
    thumbnails: int = key(2_000, "of those, how many get inlined images (the best first)")
    thumb_size: int = key(128, "longest side of an inlined thumbnail, pixels")
    ranks: int = key(1, "gallery rows per generation (1 = its best match)")
    history: str = key("", "nightly history URL: adds the checkpoint trend")
    memorized: str = key("", "copyscan memorized output URL: adds the flagged prompts and their cliques")
    memorized_prompts: int = key(50, "flagged prompts shown at most")
    memorized_images: int = key(16, "clique members shown per prompt (closest to the rest first)")
    generations: str = key(
        "", "copyscan generate output URL: adds the prompts with the highest memorisation scores"
    )
    candidates: int = key(100, "ANN candidates per index shard, re-ranked exactly (train→train, duplicates)")
    nprobe: int = key(0, "inverted lists searched per query; 0 = the index's default")
    cache_dir: str = key(
        "", 'local cache of index shards and vectors; "" = $COPYSCAN_CACHE or ~/.cache/copyscan'
    )
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (``copyscan.indexing.runtime.config.resolve`` reports them with bad
        types)."""
        problems = []
        if self.column and self.column not in COLUMNS:
            problems.append(f"column must be one of {', '.join(COLUMNS)}")
        for name in ("resamples", "gallery", "thumb_size", "ranks", "candidates"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("train_sample", "duplicate_images", "duplicate_random", "thumbnails"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not 0 < self.duplicate_margin < 1:
            problems.append("duplicate_margin must be in (0, 1)")
        return problems

    @property
    def out_url(self) -> str:
        """Where the report is written: ``out``, else ``RUN/report``."""
        return self.out or layout.report_dir(self.run)
