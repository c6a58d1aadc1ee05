"""The partial-copy threshold: which scans it applies to, and which row of a query it marks."""

import pyarrow as pa
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.config import resolve
from copyscan.search.calibrate.config import PARTIAL_SCAN, CalibrateConfig
from copyscan.search.calibrate.partial import outside_shortfall, scene_count
from copyscan.search.calibrate.thresholds import partial_answers, partial_settings, resolve_partial_threshold
from copyscan.search.calibrate.whole import format_table
from copyscan.search.scan_config import ScanConfig


def _scan(**over):
    base = {"index": "i", "queries": "q", "out": "o", **PARTIAL_SCAN}
    return resolve(ScanConfig, {**base, **over})


REGIONS = {"query_grid": "0.3:7,0.25:8", "query_size": 448}


def _manifest(cfg, build="b1", **over):
    settings = partial_settings(cfg, {"regions": REGIONS})
    partial = {
        "copies": 40,
        "negatives": 40,
        "answer": {"rank": "dense_rank", "score": "dense_score"},
        "settings": {**settings, **over},
        "recall@1": 0.85,
        "thresholds": {"p90": 0.42, "p99": None},
    }
    return {"build_id": "b1", "regions": REGIONS, "calibration": {"build_id": build, "partial": partial}}


def test_calibrated_thresholds_hold_for_the_calibrated_settings_only():
    cfg = _scan()
    assert resolve_partial_threshold(_manifest(cfg), cfg, regions=True) == (
        {
            "name": "p90",
            "rank": "dense_rank",
            "column": "dense_score",
            "value": 0.42,
            "source": "copyscan calibrate partial: 90% precision, 40 pasted copies",
        },
        None,
    )
    # the index's own query windows, given by name (with a space), are the windows left to the index
    named = _scan(region_query_grid="0.3:7, 0.25:8", region_query_size=448)
    assert resolve_partial_threshold(_manifest(cfg), named, regions=True)[0]["value"] == 0.42
    threshold, why = resolve_partial_threshold(_manifest(cfg), _scan(region_query_size=320), regions=True)
    assert threshold is None and "region_query_size=448 (this scan: 320)" in why
    threshold, why = resolve_partial_threshold(_manifest(cfg, region_refine=5), cfg, regions=True)
    assert threshold is None and "region_refine=5 (this scan: 10)" in why
    threshold, why = resolve_partial_threshold(_manifest(cfg, build="old"), cfg, regions=True)
    assert threshold is None and "no partial-copy calibration" in why  # calibrated before a rebuild
    # a calibration made before region_query_mode existed was made with cropped windows
    before = _manifest(cfg)
    del before["calibration"]["partial"]["settings"]["region_query_mode"]
    assert resolve_partial_threshold(before, cfg, regions=True)[0]["value"] == 0.42
    pooled = {**before, "embedder": {"descriptor": "copy-gem"}}
    threshold, why = resolve_partial_threshold(pooled, _scan(region_query_mode="pool"), regions=True)
    assert threshold is None and "region_query_mode='crop' (this scan: 'pool')" in why
    threshold, why = resolve_partial_threshold(_manifest(cfg), _scan(partial_threshold="p99"), regions=True)
    assert threshold is None and "no 99 % precision on 40 + 40 pasted images" in why
    bounded = _manifest(cfg)
    bounded["calibration"]["partial"]["confidence"] = 0.9
    threshold, why = resolve_partial_threshold(bounded, _scan(partial_threshold="p99"), regions=True)
    assert "no 99 % precision with 90% confidence on 40 + 40" in why and "larger partial=N" in why


def test_the_partial_threshold_follows_threshold_unless_named():
    manifest = _manifest(_scan())
    assert resolve_partial_threshold(manifest, _scan(threshold="none"), regions=True) == (None, None)
    assert resolve_partial_threshold(manifest, _scan(threshold="somepalli"), regions=True) == (None, None)
    # implied by threshold=p90 on a scan without regions: nothing to flag, nothing to warn about
    assert resolve_partial_threshold(manifest, _scan(), regions=False) == (None, None)
    threshold, why = resolve_partial_threshold(manifest, _scan(partial_threshold="p90"), regions=False)
    assert threshold is None and "no region index" in why
    given, _ = resolve_partial_threshold({}, _scan(partial_threshold=0.3, dense_verify=0), regions=True)
    assert given == {"name": "0.3", "rank": "local_rank", "column": "local_score_norm", "value": 0.3,
                     "source": "given"}  # fmt: skip
    with pytest.raises(CopyscanError, match="partial_threshold"):
        _scan(partial_threshold="strict")


def test_the_answer_is_the_row_of_rank_zero_in_the_answer_column():
    table = pa.table(
        {
            "query_id": ["a", "a", "b", "b", "c"],
            "train_key": ["x", "y", "z", "x", "w"],
            "dense_rank": [1, 0, 0, None, None],
            "dense_score": [0.9, 0.5, 0.2, None, None],
            "local_rank": [0, 1, None, 0, 0],
            "local_score_norm": [0.3, 0.1, None, 0.4, None],
        }
    )
    assert partial_answers(table, {"dense_verify": 10}) == {"a": ("y", 0.5), "b": ("z", 0.2)}
    # without dense verification: local_rank 0; a row without a score is no answer
    assert partial_answers(table, {"dense_verify": 0}) == {"a": ("x", 0.3), "b": ("x", 0.4)}


def test_calibrate_config_checks_the_partial_options():
    base = {"index": "i"}
    cfg = resolve(CalibrateConfig, {**base, "partial": 20, "outside": "/scenes"})
    assert cfg.partial_scan == PARTIAL_SCAN
    with pytest.raises(CopyscanError, match="outside"):
        resolve(CalibrateConfig, {**base, "partial": 20})
    with pytest.raises(CopyscanError, match="partial_scan cannot set out"):
        resolve(CalibrateConfig, {**base, "partial": 20, "outside": "/s", "partial_scan": {"out": "/x"}})
    with pytest.raises(CopyscanError, match="partial must be"):
        resolve(CalibrateConfig, {**base, "partial": -1})


def test_an_outside_folder_too_small_for_partial_is_named_with_the_size_that_is_not():
    """A third of ``outside`` becomes scenes: 47 images give 32 outside pastes for partial=60 (the icons
    bench), which widens the bound; the note says so and how many images would give 60."""
    assert scene_count(1) == 1 and scene_count(2) == 1 and scene_count(47) == 15 and scene_count(89) == 29
    assert outside_shortfall(89, 60) is None and outside_shortfall(8, 6) is None
    note = outside_shortfall(47, 60)
    assert "gives 32 outside pastes (47 images, 15 of them scenes), fewer than partial=60" in note
    assert note.endswith("89 images would give 60")
    assert outside_shortfall(88, 60).endswith("89 images would give 60")
    assert outside_shortfall(2, 3).endswith("4 images would give 3")  # one of 4 is a scene
    report = {
        "images": 190,
        "prevalence": 0.5,
        "recall@1": 0.94,
        "table": {},
        "partial": {
            "copies": 60,
            "negatives": 32,
            "scenes": 15,
            "outside_note": note,
            "answer": {"rank": "dense_rank", "score": "dense_score"},
            "recall@1": 1.0,
            "confidence": 0.9,
            "table": [],
            "thresholds": {"p90": 0.95, "p99": None},
            "settings": {"dense_verify": 10},
        },
    }
    assert f"  ({note})" in format_table(report).splitlines()


def test_the_partial_scan_settings_are_checked_before_calibrating():
    """partial_scan is resolved as the calibration's scan will resolve it: its typos show up front."""
    bad = {"region_refin": 10, "dense_verify": "ten", "region_slide": "0.5,2"}
    with pytest.raises(CopyscanError) as err:
        resolve(
            CalibrateConfig, {"index": "i", "partial": 20, "outside": "/s", "partial_scan": bad, "images": 5}
        )
    text = str(err.value)
    assert "partial_scan: invalid ScanConfig" in text and "did you mean region_refine?" in text
    assert (
        "dense_verify must be an integer" in text
        and "region_slide" in text
        and "images must be >= 10" in text
    )


def test_a_partial_threshold_needs_the_evidence_its_promise_does():
    """Copies and outside pastes are samples of their own, a few dozen each: the bound is the rates'
    posterior, which no threshold of 6 + 6 perfectly separated pastes reaches at 90 % (the bootstrap's would:
    no resample holds a false flag), while 200 + 200 such pastes reach it with all their recall."""
    import numpy as np

    from copyscan.search.calibrate.thresholds import precision_lower_bound, precision_table

    for n, expect in ((6, None), (200, 1.0)):
        top, other = np.linspace(0.6, 0.9, n), np.linspace(0.1, 0.4, n)
        correct = np.ones(n, dtype=bool)
        rows, named = precision_table(top, correct, other, 0.5, confidence=0.9, paired=False)
        p90 = next(r for r in rows if r["precision"] == 0.9)
        assert p90["estimate_threshold"] <= 0.6  # every copy above every negative: the estimate takes all
        if expect is None:
            assert named["p90"] is None and p90["recall"] == 0.0
            paired = precision_lower_bound(np.array([0.6]), top, correct, other, 0.5, 0.9)
            assert paired[0] == 1.0  # what the bootstrap would have promised
        else:
            assert named["p90"] <= 0.6 and p90["recall"] == expect and p90["precision_lower"] >= 0.9


def test_the_unpaired_bound_keeps_its_promise_where_the_estimate_does_not():
    """60 pasted copies whose answer is right 90 % of the time (score ~ N(2.5, 1); a wrong one ~ N(0, 1)) and
    60 outside pastes (~ N(0, 1)), 30 samples: the estimate's p90 falls short of 90 % true precision about
    half the time, the bound's rarely, and it still gives a threshold in most samples."""
    import numpy as np
    from scipy.stats import norm

    from copyscan.search.calibrate.thresholds import precision_table

    def true_precision(t):  # 50 % prevalence; a wrong answer above t is a false flag too
        right, wrong, unseen = 0.9 * norm.sf(t - 2.5), 0.1 * norm.sf(t), norm.sf(t)
        return right / (right + wrong + unseen)

    kept = {"estimate": 0, "bound": 0, "bound_given": 0}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        correct = rng.random(60) < 0.9
        top = np.where(correct, rng.normal(2.5, 1.0, 60), rng.normal(0.0, 1.0, 60))
        other = rng.normal(0.0, 1.0, 60)
        rows, _ = precision_table(top, correct, other, 0.5, confidence=0.9, seed=seed, paired=False)
        p90 = next(r for r in rows if r["precision"] == 0.9)
        kept["estimate"] += true_precision(p90["estimate_threshold"]) >= 0.9
        if p90["threshold"] is not None:
            kept["bound_given"] += 1
            kept["bound"] += true_precision(p90["threshold"]) >= 0.9
    # measured: the estimate kept it in 15 samples, the bound in 26 of the 27 it gave a threshold in
    assert kept["bound_given"] >= 24 and kept["bound"] >= kept["bound_given"] - 3, kept
    assert kept["estimate"] <= 20 and kept["bound"] >= kept["estimate"] + 8, kept
