"""``ReportConfig``: every knob of ``copyscan report``, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from indexing.errors import CopyscanError
from indexing.store import layout

COLUMNS = ("score", "score_raw", "score_norm")  # the score columns the report describes


@dataclass(frozen=True)
class ReportConfig:
    """Every knob of ``copyscan report``; set with a YAML file (``--config``) and/or ``key=value``."""

    run: str  # URL of a finished scan output
    out: str = ""  # "" = RUN/report
    index: str = ""  # "" = the index the run scanned (its run.yaml)
    column: str = ""  # score column the HTML leads with; "" = the run's threshold column, else score
    thresholds: list[float] = field(default_factory=lambda: [0.5])  # fractions above, for every column
    train_sample: int = 2_000  # training images searched for the train→train distribution
    seed: int = 0
    resamples: int = 1_000  # bootstrap resamples of the mean shift (fractions use Wilson intervals)
    duplicate_radius: float = 0.95  # near-duplicate: ``score`` (the index's space) ≥ this
    duplicate_margin: float = 0.1  # range search radius = duplicate_radius − margin, then exact re-score
    duplicate_images: int = 1_000  # matched training images counted at most (highest-scoring first)
    duplicate_random: int = 1_000  # random training images, the baseline
    gallery: int = 10_000  # best matches listed in the HTML gallery
    thumbnails: int = 2_000  # of those, how many get inlined images (the best first)
    thumb_size: int = 128  # longest side of an inlined thumbnail, pixels
    ranks: int = 1  # gallery rows per generation (1 = its best match)
    history: str = ""  # nightly history URL: adds the checkpoint trend
    memorized: str = ""  # copyscan memorized output URL: adds the flagged prompts and their cliques
    memorized_prompts: int = 50  # flagged prompts shown at most
    memorized_images: int = 16  # clique members shown per prompt (closest to the rest first)
    candidates: int = 100
    nprobe: int = 0  # 0 = the index's default
    cache_dir: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
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
        if problems:
            raise CopyscanError("invalid report config: " + "; ".join(problems))

    @property
    def out_url(self) -> str:
        """Where the report is written: ``out``, else ``RUN/report``."""
        return self.out or layout.report_dir(self.run)
