"""Configuration of ``copyscan calibrate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import key, resolve

# The settings measured best for pasted objects (README, Evaluation: recall@1 0.85 on held-out copies)
PARTIAL_SCAN = {"region_refine": 10, "region_slide": "0.5,0.4,0.45x0.3,0.3x0.45", "dense_verify": 10}


@dataclass(frozen=True)
class CalibrateConfig:
    """Every knob of ``copyscan calibrate``; set with a YAML file (``--config``) and/or ``key=value``."""

    index: str = key(help="URL of a finished copyscan index")
    images: int = key(1_000, "training images copied (read back from the index's source shards)")
    max_shards: int = key(16, "source shards read at most")
    prevalence: float = key(0.5, "share of copies among the queries the thresholds are for")
    seed: int = key(1_234, "random seed (images sampled, copies, pastes)")
    # The thresholds are those whose precision's lower bound reaches the target with this confidence, not the
    # point estimate's: the margin a sample of a few hundred copies needs (README, Evaluation: "Calibration
    # per domain"); a bootstrap over the copies for whole copies, the rates' posterior for partial=N's
    # pastes (search/calibrate/thresholds.py). 0 = the point estimate
    confidence: float = key(0.9, "confidence that a threshold's precision reaches its target; 0 = estimate")
    # Copies' negatives scored with the whitening fit again without their sources, as an unseen image's are
    # (search/calibrate/heldout.py), where every vector of the index was in the whitening's fit; one refit
    # leaves out at most this share of the fitted vectors (leave-one-out on an index of < 100). 0 = in-sample
    held_out_share: float = key(
        0.01, "share of the whitening's vectors a refit holds out for the copies' negatives; 0 = off"
    )
    candidates: int = key(100, "ANN candidates per index shard, re-ranked exactly")
    nprobe: int = key(0, "inverted lists searched per query; 0 = the index's default")
    batch_size: int = key(64, "images per forward pass")
    weights: str | None = key(None, "embedder weights; null = those the index was built with")
    device: str = key("auto", "torch device of the embedder: auto (CUDA when there is one), cpu, cuda, ...")
    cache_dir: str = key(
        "", 'local cache of index shards and vectors; "" = $COPYSCAN_CACHE or ~/.cache/copyscan'
    )
    storage_options: dict[str, Any] = key(
        help="passed to every fsspec filesystem, e.g. {endpoint_url: http://...}", factory=dict, shown=False
    )
    # Partial copies (an index with a region index; search/calibrate/partial.py): ``partial`` training
    # images pasted into scenes from ``outside`` (a folder of image files not in the training set), and as
    # many outside images pasted the same way, scanned on Ray with the copyscan scan settings
    # ``partial_scan``, give the thresholds of the partial answer (dense_score of dense_rank 0 with
    # dense_verify, else local_score_norm of local_rank 0). 0 = off
    partial: int = key(
        0, "training images pasted into outside scenes and scanned, for partial-copy thresholds; 0 = off"
    )
    outside: str = key("", "folder of images not in the training set: the scenes for partial=N")
    partial_scan: dict[str, Any] = key(
        help="copyscan scan settings of the partial-copy calibration scan", factory=lambda: dict(PARTIAL_SCAN)
    )

    # Whole-copy verification (search/calibrate/verified.py): the thresholds of verify_score for scans with
    # verify_whole=N and this weight, from the same verification run on the copies; 0 = off
    verify_whole: int = key(
        0, "verify each copy's N best matches as a scan with verify_whole=N does: verify_score thresholds"
    )
    verify_whole_weight: float = key(
        2.0, "the scan's verify_whole_weight the verify_score thresholds are for"
    )

    def problems(self) -> list[str]:
        """Every problem of these settings (``copyscan.indexing.runtime.config.resolve`` reports them with bad
        types)."""
        problems = []
        if self.partial < 0:
            problems.append("partial must be >= 0 (0 = whole copies only)")
        elif self.partial and not self.outside:
            problems.append(
                f"partial={self.partial} pastes into scenes from outside the training set: give outside=URL, "
                "a folder of images that are not in the index"
            )
        fixed = sorted(set(self.partial_scan) & {"index", "queries", "out", "threshold", "partial_threshold"})
        if fixed:
            problems.append(f"partial_scan cannot set {', '.join(fixed)} (the calibration sets them)")
        problems += self._partial_scan_problems()
        if not (self.verify_whole == 0 or self.verify_whole >= 2) or self.verify_whole_weight <= 0:
            problems.append(
                f"verify_whole must be 0 (off) or >= 2 (a candidate is read against the others), not "
                f"{self.verify_whole}, and verify_whole_weight positive"
            )
        if self.images < 10:
            problems.append("images must be >= 10")
        if not 0.0 < self.prevalence < 1.0:
            problems.append("prevalence must be in (0, 1)")
        if not 0.0 <= self.confidence < 1.0:
            problems.append("confidence must be in [0, 1) (0 = the point estimate)")
        if not 0.0 <= self.held_out_share <= 0.5:
            problems.append("held_out_share must be in [0, 0.5] (0 = off)")
        if self.max_shards < 1 or self.candidates < 2 or self.batch_size < 1:
            problems.append("max_shards, batch_size must be >= 1 and candidates >= 2")
        return problems

    def _partial_scan_problems(self) -> list[str]:
        """``partial_scan`` checked as the calibration's scan will resolve it (search/calibrate/partial.py),
        so a typo shows before the whole copies are calibrated, not after."""
        from copyscan.search.scan_config import ScanConfig

        fixed = {"index": "-", "queries": "-", "out": "-", "regions": "on"}
        try:
            resolve(ScanConfig, self.partial_scan, fixed)
        except CopyscanError as exc:
            return [f"partial_scan: {exc}"]
        return []
