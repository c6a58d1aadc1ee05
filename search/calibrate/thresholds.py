"""What a calibration means to a scan: precision/recall tables and thresholds, and which threshold ``is_copy``
and ``is_partial_copy`` apply (``threshold=``, ``partial_threshold=``). Reads the manifest only; no model, no Ray."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.models.regions import query_mode

PRECISIONS = (0.5, 0.8, 0.9, 0.95, 0.99)
# Resamples of the bootstrap bound on precision: its 10 % quantile moves by < 0.005 between seeds at 1,000
BOOTSTRAP_RESAMPLES = 1_000


def precision_recall(
    s_top: np.ndarray, correct: np.ndarray, s_other: np.ndarray, prevalence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, precision, recall) of "top-1 score ≥ t" at every observed score t."""
    thresholds = np.unique(np.concatenate([s_top, s_other]))[::-1]
    precision, recall = _precision_at(thresholds, s_top, correct, s_other, prevalence)
    return thresholds, precision, recall


def _count_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``values`` are ≥ each of ``thresholds`` (int array shaped like ``thresholds``)."""
    return len(values) - np.searchsorted(np.sort(values), thresholds, side="left")


def _precision_at(
    thresholds: np.ndarray, s_top: np.ndarray, correct: np.ndarray, s_other: np.ndarray, prevalence: float
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of "top-1 score ≥ t" at each of ``thresholds``."""
    n = len(s_top)
    tp, flagged, false_unseen = (
        _count_at_least(values, thresholds) / n for values in (s_top[correct], s_top, s_other)
    )
    denominator = prevalence * flagged + (1.0 - prevalence) * false_unseen
    precision = np.where(denominator > 0, prevalence * tp / np.maximum(denominator, 1e-12), 1.0)
    return precision, tp


def precision_lower_bound(
    thresholds: np.ndarray,
    s_top: np.ndarray,
    correct: np.ndarray,
    s_other: np.ndarray,
    prevalence: float,
    confidence: float,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """A one-sided lower confidence bound, at ``confidence``, of the precision at each of ``thresholds``:
    the (1 − confidence) quantile of the precision over ``resamples`` bootstrap resamples of the copies (each
    copy's top-1 score, whether it is right, and its best non-source score drawn together)."""
    rng = np.random.default_rng(seed)
    n = len(s_top)
    # each resample as how often it draws each copy: (resamples, n) counts, summed above each threshold
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)

    def at_least(values: np.ndarray, w: np.ndarray) -> np.ndarray:
        order = np.argsort(-values, kind="stable")
        cumulative = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w[:, order], axis=1)], axis=1)
        return cumulative[:, _count_at_least(values, thresholds)] / n

    flagged = at_least(s_top, weights)
    tp = at_least(s_top, weights * correct[None, :])
    false_unseen = at_least(s_other, weights)
    denominator = prevalence * flagged + (1.0 - prevalence) * false_unseen
    curves = np.where(denominator > 0, prevalence * tp / np.maximum(denominator, 1e-12), 1.0)
    return np.quantile(curves, 1.0 - confidence, axis=0)


def precision_lower_bound_unpaired(
    thresholds: np.ndarray,
    s_top: np.ndarray,
    correct: np.ndarray,
    s_other: np.ndarray,
    prevalence: float,
    confidence: float,
    draws: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> np.ndarray:
    """``precision_lower_bound`` for copies and negatives sampled apart (``s_other`` of any length, one score
    per negative generation, as partial-copy calibration's outside pastes): the (1 − confidence) quantile of
    the precision at each of ``thresholds`` over ``draws`` draws from the posterior of the rates (Jeffreys
    prior): a copy's outcome above or below the threshold, right or wrong, Dirichlet(k + ½); a negative
    above it, Beta(k + ½, m − k + ½).

    Where the bootstrap resamples what was seen, this stays honest at small counts: a threshold that only 2
    copies and no negative of 30 each pass has a bootstrap bound of 1 (no resample holds a false flag), but
    a false-flag rate of 2 % gives no false flag in 30 more than half the time (0.98³⁰ = 0.55), and the
    posterior keeps such rates."""
    rng = np.random.default_rng(seed)
    n, m = len(s_top), len(s_other)
    above, right, false = (_count_at_least(v, thresholds) for v in (s_top, s_top[correct], s_other))
    # Dirichlet(right, wrong, below) as three gammas normalised: (draws, thresholds) each
    a_right, a_wrong, a_below = right + 0.5, above - right + 0.5, n - above + 0.5
    g_right = rng.standard_gamma(a_right, size=(draws, len(thresholds)))
    g_wrong = rng.standard_gamma(a_wrong, size=(draws, len(thresholds)))
    g_below = rng.standard_gamma(a_below, size=(draws, len(thresholds)))
    total = g_right + g_wrong + g_below
    tpr, wrong = g_right / total, g_wrong / total
    fpr = rng.beta(false + 0.5, m - false + 0.5, size=(draws, len(thresholds)))
    curves = prevalence * tpr / (prevalence * (tpr + wrong) + (1.0 - prevalence) * fpr)
    return np.quantile(curves, 1.0 - confidence, axis=0)


def threshold_for(thresholds: np.ndarray, precision: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose precision reaches ``target`` (None when none does)."""
    ok = np.nonzero(precision >= target)[0]
    return float(thresholds[ok[-1]]) if len(ok) else None


def precision_table(
    top: np.ndarray,
    correct: np.ndarray,
    other: np.ndarray,
    prevalence: float,
    confidence: float = 0.0,
    seed: int = 0,
    paired: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    """The calibration table of one score (``precision_recall``'s arguments; NaN = no match): for each of
    ``PRECISIONS`` its threshold and recall, and the p90 / p99 thresholds by name.

    ``confidence`` > 0: a threshold is the lowest whose precision's lower bound at that confidence reaches
    the target, not the lowest whose estimate does; each row also gives the estimate's threshold
    (``estimate_threshold``) and the bound at the chosen one (``precision_lower``), so the margin the
    sample's size costs is visible. 0: the estimate, as before. The bound: ``paired``, each copy's best
    non-source score in ``other`` (whole copies), the bootstrap over the copies
    (``precision_lower_bound``); else negatives of their own (partial copies' outside pastes, a few dozen
    of each), the posterior of ``precision_lower_bound_unpaired``."""
    top = np.nan_to_num(np.asarray(top, dtype=np.float64), nan=-np.inf)
    other = np.nan_to_num(np.asarray(other, dtype=np.float64), nan=-np.inf)
    correct = np.asarray(correct, dtype=bool)
    thresholds, precision, recall = precision_recall(top, correct, other, prevalence)
    lower = None
    if confidence > 0:
        bound = precision_lower_bound if paired else precision_lower_bound_unpaired
        lower = bound(thresholds, top, correct, other, prevalence, confidence, seed=seed)
    rows = []
    for target in PRECISIONS:
        estimate = threshold_for(thresholds, precision, target)
        t = estimate if lower is None else threshold_for(thresholds, lower, target)
        r = float(recall[thresholds >= t].max()) if t is not None else 0.0
        row: dict[str, Any] = {"precision": target, "threshold": t, "recall": r}
        if lower is not None:
            row["estimate_threshold"] = estimate
            row["precision_lower"] = float(lower[thresholds == t][0]) if t is not None else None
        rows.append(row)
    named = {f"p{round(r['precision'] * 100)}": r["threshold"] for r in rows if r["precision"] in (0.9, 0.99)}
    return rows, named


# Thresholds from the papers, by name (METHODS.md): on the raw descriptor cosine, meaningful for SSCD.
NAMED_THRESHOLDS = {"somepalli": ("score_raw", 0.5), "duplicate": ("score_raw", 0.95)}


def resolve_threshold(
    manifest: dict[str, Any], name: str | float, verified: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What ``is_copy`` means for threshold ``name``: {"name", "column", "value", "source"}, or None.

    "p90" / "p99": the index's calibrated ``score_norm`` thresholds (None if it was not calibrated, or was
    rebuilt since); "somepalli" (score_raw ≥ 0.5) / "duplicate" (score_raw ≥ 0.95): from the papers; a
    number: ``score_norm`` ≥ that number; "none": no flag.

    ``verified``: the whole-copy verification settings of the scan (``copyscan.search.calibrate.verified
    .verify_settings``; None: it verifies nothing). Where the calibration verified its copies with the same
    settings (``copyscan calibrate verify_whole=N``), "p90" / "p99" are its ``verify_score`` thresholds, on
    the verified answers: {..., "column": "verify_score", "rank": "verify_rank"} (None if it reached none).
    """
    name = str(name)
    if name == "none":
        return None
    if name in ("p90", "p99"):
        cal = manifest.get("calibration")
        if not cal or cal.get("build_id") != manifest.get("build_id"):
            return None
        if verified is not None and (cal.get("verify_whole") or {}).get("settings") == verified:
            value = cal["thresholds"].get("verify_score", {}).get(name)
            if value is None:
                return None
            source = (
                f"copyscan calibrate verify_whole={verified['verify_whole']}: {name[1:]}% precision at "
                f"{cal['prevalence']:.0%} copies"
            )
            return {
                "name": name,
                "column": "verify_score",
                "rank": "verify_rank",
                "value": float(value),
                "source": source,
            }
        value = cal["thresholds"]["score_norm"].get(name)
        if value is None:
            return None
        source = f"copyscan calibrate: {name[1:]}% precision at {cal['prevalence']:.0%} copies"
        return {"name": name, "column": "score_norm", "value": float(value), "source": source}
    if name in NAMED_THRESHOLDS:
        column, value = NAMED_THRESHOLDS[name]
        return {"name": name, "column": column, "value": value, "source": "METHODS.md (published)"}
    try:
        value = float(name)
    except ValueError:
        raise CopyscanError(
            f"threshold {name!r}: use p90, p99, somepalli, duplicate, none or a score_norm value"
        ) from None
    return {"name": name, "column": "score_norm", "value": value, "source": "given"}


# The scan settings a partial answer's score depends on: calibrated thresholds apply to a scan with the
# same values only
PARTIAL_KEYS = (
    "beta",
    "region_query_grid",
    "region_query_size",
    "region_query_mode",
    "region_hits",
    "region_density_beta",
    "region_refine",
    "region_slide",
    "dense_verify",
    "dense_weight",
)


def partial_settings(cfg: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``PARTIAL_KEYS`` of scan config ``cfg`` as they apply to the index of ``manifest``: the query
    windows' grid and size resolved to the index's when left to it, grids without spaces, so that
    ``region_query_grid=`` and the index's own grid given by name compare equal."""
    settings = {key: getattr(cfg, key) for key in PARTIAL_KEYS}
    described = manifest.get("regions") or {}
    settings["region_query_grid"] = settings["region_query_grid"] or described.get("query_grid", "")
    if described:  # the mode the windows are made in (pool and hybrid fall back to crop) and its size
        mode, settings["region_query_size"] = query_mode(
            manifest, settings["region_query_mode"], settings["region_query_size"], bool(cfg.split_product)
        )
        settings["region_query_mode"] = settings["region_query_mode"] if mode == "rmac" else "crop"
    for key in ("region_query_grid", "region_slide"):
        settings[key] = "".join(str(settings[key]).split())
    return settings


def answer_columns(settings: dict[str, Any]) -> tuple[str, str]:
    """(rank column, score column) of a generation's partial answer under scan ``settings``."""
    return (
        ("dense_rank", "dense_score") if settings.get("dense_verify") else ("local_rank", "local_score_norm")
    )


def partial_answers(table: Any, settings: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """{query_id: (train_key, score)} of each generation's partial answer in a scan's ``matches`` table."""
    rank, score = answer_columns(settings)
    rows = table.filter(pc.equal(table[rank], 0)).select(["query_id", "train_key", score]).to_pylist()
    return {r["query_id"]: (r["train_key"], r[score]) for r in rows if r[score] is not None}


def resolve_partial_threshold(
    manifest: dict[str, Any], cfg: Any, regions: bool
) -> tuple[dict[str, Any] | None, str | None]:
    """What ``is_partial_copy`` means for scan config ``cfg`` ({"name", "rank", "column", "value", "source"})
    and, when it stays empty, why (None when it was not asked for). ``regions``: the scan searches a region
    index. Calibrated thresholds apply only to a scan with the calibration's ``PARTIAL_KEYS`` settings."""
    name = str(cfg.partial_threshold) or (
        str(cfg.threshold) if str(cfg.threshold) in ("p90", "p99") else "none"
    )
    if name == "none":
        return None, None
    if not regions:  # asked for by name: say why it stays empty; implied by threshold: nothing to say
        return None, ("the scan searches no region index" if str(cfg.partial_threshold) else None)
    settings = partial_settings(cfg, manifest)
    rank, column = answer_columns(settings)
    if name not in ("p90", "p99"):
        return {"name": name, "rank": rank, "column": column, "value": float(name), "source": "given"}, None
    calibration = manifest.get("calibration") or {}
    partial = calibration.get("partial")
    if not partial or calibration.get("build_id") != manifest.get("build_id"):
        return None, "the index has no partial-copy calibration (copyscan calibrate partial=N outside=URL)"
    calibrated = {"region_query_mode": "crop", **partial["settings"]}  # calibrated before pooled windows
    if calibrated != settings:
        differ = ", ".join(
            f"{k}={calibrated.get(k)!r} (this scan: {settings[k]!r})"
            for k in PARTIAL_KEYS
            if calibrated.get(k) != settings[k]
        )
        return None, f"its partial-copy thresholds hold for other scan settings: {differ}"
    value = partial["thresholds"].get(name)
    if value is None:
        how = f" with {partial['confidence']:.0%} confidence" if partial.get("confidence") else ""
        return None, (
            f"its partial-copy calibration reached no {name[1:]} % precision{how} on {partial['copies']} + "
            f"{partial['negatives']} pasted images (calibrate with a larger partial=N)"
        )
    source = f"copyscan calibrate partial: {name[1:]}% precision, {partial['copies']} pasted copies"
    return {"name": name, "rank": rank, "column": column, "value": float(value), "source": source}, None
