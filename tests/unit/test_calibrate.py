"""Calibration arithmetic and threshold names (the end-to-end run is in tests/integration)."""

import numpy as np
import pytest

from copyscan.indexing.errors import CopyscanError
from copyscan.search.calibrate.sample import select_rows
from copyscan.search.calibrate.thresholds import precision_recall, resolve_threshold, threshold_for


def test_precision_and_recall_by_hand():
    # 4 copies: top-1 scores and whether the top-1 is the source; their best non-source scores
    s_top = np.array([0.9, 0.8, 0.6, 0.3])
    correct = np.array([True, True, False, True])
    s_other = np.array([0.2, 0.7, 0.6, 0.1])
    t, precision, recall = precision_recall(s_top, correct, s_other, prevalence=0.5)
    by_t = {
        round(float(a), 2): (round(float(p), 4), float(r))
        for a, p, r in zip(t, precision, recall, strict=True)
    }
    # t = 0.8: flagged copies 2 (both right), unseen above: 0 → precision 1, recall 2/4
    assert by_t[0.8] == (1.0, 0.5)
    # t = 0.7: copies flagged 2 (right), unseen flagged 1/4 → 0.5·0.5 / (0.5·0.5 + 0.5·0.25) = 2/3
    assert by_t[0.7] == (round(2 / 3, 4), 0.5)
    # t = 0.6: copies flagged 3 (one wrong), unseen 2/4 → 0.5·0.5 / (0.5·0.75 + 0.5·0.5) = 0.4
    assert by_t[0.6] == (0.4, 0.5)
    assert threshold_for(t, precision, 0.9) == pytest.approx(0.8)
    assert threshold_for(t, precision, 0.6) == pytest.approx(0.7)
    # rarer copies need a higher threshold for the same precision
    t2, p2, _ = precision_recall(s_top, correct, s_other, prevalence=0.1)
    assert threshold_for(t2, p2, 0.6) == pytest.approx(0.8)


def _manifest(calibrated=True, build="b1"):
    m = {"build_id": "b1", "config": {"whitening_pair_images": 4}, "whitening": {"kind": "learned"}}
    m["embedding_shards"] = [{"shard": s, "count": 10} for s in range(2)]
    if calibrated:
        m["calibration"] = {
            "build_id": build,
            "prevalence": 0.5,
            "thresholds": {"score_norm": {"p90": 0.11, "p99": 0.26}, "score": {"p90": 0.3, "p99": 0.46}},
        }
    return m


def test_threshold_names():
    assert resolve_threshold(_manifest(), "p90") == {
        "name": "p90",
        "column": "score_norm",
        "value": 0.11,
        "source": "copyscan calibrate: 90% precision at 50% copies",
    }
    assert resolve_threshold(_manifest(), "p99")["value"] == 0.26
    assert resolve_threshold(_manifest(calibrated=False), "p90") is None
    assert resolve_threshold(_manifest(build="old"), "p90") is None  # calibrated before a rebuild
    assert resolve_threshold(_manifest(), "somepalli")["column"] == "score_raw"
    assert resolve_threshold(_manifest(), "duplicate")["value"] == 0.95
    assert resolve_threshold(_manifest(), 0.2) == {
        "name": "0.2",
        "column": "score_norm",
        "value": 0.2,
        "source": "given",
    }
    assert resolve_threshold(_manifest(), "none") is None
    with pytest.raises(CopyscanError, match="p90, p99"):
        resolve_threshold(_manifest(), "strict")


def test_a_verified_scan_reads_verify_score_thresholds_only_where_calibrated_for_its_settings():
    settings = {"verify_whole": 10, "verify_whole_weight": 2.0, "query_side": 224, "train_side": 320}
    m = _manifest()
    assert resolve_threshold(m, "p90", settings)["column"] == "score_norm"  # calibrated without verification
    m["calibration"]["verify_whole"] = {"settings": settings, "recall@1": 0.97}
    m["calibration"]["thresholds"]["verify_score"] = {"p90": 0.42, "p99": None}
    assert resolve_threshold(m, "p90", settings) == {
        "name": "p90",
        "column": "verify_score",
        "rank": "verify_rank",
        "value": 0.42,
        "source": "copyscan calibrate verify_whole=10: 90% precision at 50% copies",
    }
    assert resolve_threshold(m, "p99", settings) is None  # the verified calibration reached no 99 %
    assert resolve_threshold(m, "p90")["column"] == "score_norm"  # a scan that does not verify
    other = {**settings, "verify_whole_weight": 4.0}
    assert resolve_threshold(m, "p90", other)["value"] == 0.11
    assert resolve_threshold(m, 0.3, settings)["column"] == "score_norm"  # a given value is score_norm's


def test_calibration_rows_avoid_the_whitening_pairs_unless_the_index_is_too_small():
    rows, reused = select_rows(_manifest(), images=12, max_shards=4, seed=0)
    assert not reused and sum(map(len, rows.values())) == 12
    assert all(r.min() >= 2 for r in rows.values())  # pair_quota(4, 2 shards) = first 2 rows of each
    rows, reused = select_rows(_manifest(), images=100, max_shards=4, seed=0)
    assert not reused and sum(map(len, rows.values())) == 16
    small = _manifest()
    small["embedding_shards"] = [{"shard": 0, "count": 12}]
    small["config"]["whitening_pair_images"] = 10
    rows, reused = select_rows(small, images=100, max_shards=4, seed=0)
    assert reused and sorted(rows[0]) == list(range(12))


def test_calibration_draws_keys_not_positions():
    """The same images are chosen whatever order the shard's samples were written in."""
    manifest = _manifest()
    keys = {
        e["shard"]: [f"{e['shard']}-{i:03d}" for i in range(e["count"])] for e in manifest["embedding_shards"]
    }
    rng = np.random.default_rng(1)
    # the same images, shuffled except for the pair images at the front (their rows are fixed)
    shuffled = {s: k[:2] + [k[2:][i] for i in rng.permutation(len(k) - 2)] for s, k in keys.items()}

    def chosen(key_lists):
        rows, _ = select_rows(manifest, images=6, max_shards=4, seed=0, keys_of=lambda s: key_lists[s])
        return {key_lists[s][r] for s, rr in rows.items() for r in rr}

    assert chosen(keys) == chosen(shuffled) and len(chosen(keys)) == 6
    # without keys the draw is of positions, and changes with the order
    rows, _ = select_rows(manifest, images=6, max_shards=4, seed=0)
    assert {shuffled[s][r] for s, rr in rows.items() for r in rr} != chosen(keys)


def test_calibration_rows_make_up_a_small_shard_from_the_others():
    """A shard with fewer free rows than its share (e.g. all whitening pairs) leaves the rest to the others:
    an index of 250 + 50 images with 120 pair images gives 180 copies, not the 90 of an even split."""
    manifest = _manifest()
    manifest["embedding_shards"] = [{"shard": 0, "count": 250}, {"shard": 1, "count": 50}]
    manifest["config"]["whitening_pair_images"] = 120  # pair_quota: the first 60 rows of each shard
    rows, reused = select_rows(manifest, images=180, max_shards=4, seed=0)
    assert not reused and sum(map(len, rows.values())) == 180 and 1 not in rows
    assert rows[0].min() >= 60 and len(set(rows[0].tolist())) == 180
    # an even split that fits draws what it drew before (no make-up: same sizes, same draws)
    even, _ = select_rows(_manifest(), images=12, max_shards=4, seed=0)
    assert sorted(map(len, even.values())) == [6, 6]


def _true_precision(t: float, shift: float, prevalence: float = 0.5) -> float:
    """Precision of "score ≥ t" when copies score N(shift, 1) (always their source) and unseen images N(0, 1)."""
    from math import erf, sqrt

    def above(mean: float) -> float:
        return 0.5 * (1 - erf((t - mean) / sqrt(2)))

    return prevalence * above(shift) / (prevalence * above(shift) + (1 - prevalence) * above(0.0))


def test_a_bounded_threshold_keeps_its_promise_where_the_estimate_does_not():
    """With copies ~ N(2, 1) and unseen ~ N(0, 1), the lowest threshold whose *estimated* precision reaches 0.9
    gives less than 0.9 about half the time (a noisy curve first crosses 0.9 on a lucky dip); the lowest whose
    90 % bootstrap lower bound does gives at least 0.9 in most samples, and costs less margin the more copies
    there are."""
    from copyscan.search.calibrate.thresholds import precision_table

    kept = {0.0: 0, 0.9: 0}
    margins = {}
    for n in (150, 1500):
        margin = []
        for seed in range(30 if n == 150 else 5):
            rng = np.random.default_rng(seed)
            top, other = rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)
            correct = np.ones(n, dtype=bool)
            rows, named = precision_table(top, correct, other, 0.5, confidence=0.9, seed=seed)
            p90 = next(r for r in rows if r["precision"] == 0.9)
            assert named["p90"] == p90["threshold"] >= p90["estimate_threshold"]
            assert p90["precision_lower"] >= 0.9
            margin.append(p90["threshold"] - p90["estimate_threshold"])
            if n == 150:
                kept[0.9] += _true_precision(p90["threshold"], 2.0) >= 0.9
                kept[0.0] += _true_precision(p90["estimate_threshold"], 2.0) >= 0.9
        margins[n] = float(np.mean(margin))
    # of 30 samples (measured: 24 and 12)
    assert kept[0.9] >= 22 and kept[0.0] <= 16 and kept[0.9] >= kept[0.0] + 8, kept
    assert margins[1500] < margins[150] / 2, margins
    # confidence 0: the point estimate, and the rows say nothing more
    rows, _ = precision_table(top, correct, other, 0.5)
    assert set(rows[0]) == {"precision", "threshold", "recall"}


def test_held_out_negatives_where_every_vector_fitted_the_whitening():
    from copyscan.search.calibrate.heldout import held_out_reason

    manifest = {"ntotal": 300, "whitening": {"kind": "learned", "fit_vectors": 300, "from": None}}
    assert held_out_reason(manifest) is None
    sampled = {"ntotal": 500_000, "whitening": {"kind": "learned", "fit_vectors": 100_000}}
    assert "sample of 100000 of 500000" in held_out_reason(sampled)
    assert "not fit on its own" in held_out_reason({"ntotal": 10, "whitening": {"from": "s3://b/w.npz"}})
    assert "not fit on its own" in held_out_reason({"ntotal": 10, "whitening": None})
