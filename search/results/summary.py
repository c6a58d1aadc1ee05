"""Run-level summaries of a scan's chunk markers: counts, top-1 score distributions, verification counts
(the body of ``OUT/summary.json``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# queries named per rejection reason in the summary
REJECTED_NAMED = 20


def summarize(markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Run-level counts and the distributions of top-1 ``score`` and ``score_norm`` (one per query)."""
    by_reason: dict[str, int] = {}
    named: dict[str, list[str]] = {}
    for m in markers.values():
        for rej in m["rejections"]:
            by_reason[rej["reason"]] = by_reason.get(rej["reason"], 0) + 1
            keys = named.setdefault(rej["reason"], [])
            if len(keys) < REJECTED_NAMED:
                keys.append(rej["key"])
    summary: dict[str, Any] = {
        "chunks": len(markers),
        "queries": sum(m["queries"] for m in markers.values()),
        "embedded": sum(m["embedded"] for m in markers.values()),
        "rejected": sum(m["rejected"] for m in markers.values()),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        # the first queries rejected for each reason (every rejection is in its chunk's marker)
        "rejected_examples": dict(sorted(named.items())),
        "matches": sum(m["matches"] for m in markers.values()),
        "flagged": None
        if any(m.get("flagged") is None for m in markers.values())
        else sum(m["flagged"] for m in markers.values()),
    }
    for name in ("flagged_partial", "flagged_any"):  # scans with a partial threshold
        if markers and all(m.get(name) is not None for m in markers.values()):
            summary[name] = sum(m[name] for m in markers.values())
    radius = [m["radius"] for m in markers.values() if m.get("radius")]
    if radius:  # scan option radius: matches past the top k (copyscan.search.ann.radius.radius_counts)
        summary["radius"] = {name: sum(r[name] for r in radius) for name in radius[0]}
    verification = summarize_verification(markers)
    if verification is not None:
        summary["verification"] = verification
    for name, key in (("top1_score", "top1_scores"), ("top1_score_norm", "top1_scores_norm")):
        values = np.array([s for m in markers.values() for s in m.get(key, [])], dtype=np.float64)
        if len(values):
            summary[name] = _distribution(values)
    return summary


def _distribution(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        **{f"p{q}": float(np.percentile(values, q)) for q in (50, 75, 90, 95, 99)},
        "max": float(values.max()),
    }


def _match_verification(prefix: str, chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of a match verification (dense, whole) over its chunks, from their ``{prefix}_*`` entries."""
    return {
        "chunks": len(chunks),
        "pairs": sum(v[f"{prefix}_pairs"] for v in chunks),
        "verified": sum(v[f"{prefix}_verified"] for v in chunks),
        "no_fit": sum(v[f"{prefix}_no_fit"] for v in chunks),
        "errors": _sum_counts(v[f"{prefix}_errors"] for v in chunks),
        "seconds": round(sum(v[f"{prefix}_seconds"]["total"] for v in chunks), 1),
    }


def summarize_verification(markers: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Run-level verification counts (pixels, dense) from the chunk markers (None when none was verified).

    ``extracted_queries``: generations with at least one (l2, delta)-extracted match; ``errors``: pairs
    that could not be verified, by reason; ``density``: density-relative counts (scan option
    density_neighbours), when on; ``dense``: dense-verification counts (scan option dense_verify), when on;
    ``whole``: whole-copy verification counts (scan option verify_whole), when on."""
    markers_verify = [m["verify"] for m in markers.values() if m.get("verify")]
    verified = [v for v in markers_verify if "verify_pairs" in v]
    dense = [v for v in markers_verify if "dense_pairs" in v]
    whole = [v for v in markers_verify if "whole_pairs" in v]
    if not verified and not dense and not whole:
        return None
    out: dict[str, Any] = {}
    if verified:
        out.update(
            {
                "chunks": len(verified),
                "pairs": sum(v["verify_pairs"] for v in verified),
                "verified": sum(v["verified"] for v in verified),
                "extracted": sum(v["extracted"] for v in verified),
                # chunks hold distinct queries
                "extracted_queries": sum(v["extracted_queries"] for v in verified),
                "errors": _sum_counts(v["verify_errors"] for v in verified),
            }
        )
    if any("density_scored" in v for v in verified):
        names = ("density_scored", "density_extracted", "neighbour_pairs", "neighbour_failed")
        out["density"] = {name: sum(v.get(name, 0) for v in verified) for name in names}
    for name, chunks in (("dense", dense), ("whole", whole)):
        if chunks:
            out[name] = _match_verification(name, chunks)
    return out


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """{reason: count} dicts added up, sorted by reason."""
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))
