"""Whitening and score normalisation (indexing/build/postprocess.py), checked by hand and on planted structure."""

from __future__ import annotations

import numpy as np
import pytest

from copyscan.indexing.build import postprocess
from copyscan.indexing.errors import CopyscanError


def test_whitening_decorrelates_and_shrinkage_interpolates():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    xb = (rng.normal(size=(4000, 8)) * np.array([5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1])) @ basis.T + 1.0
    full = postprocess.fit_whitening(xb, shrinkage=0.0)
    y = (xb - full["mean"]) @ full["proj"]
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(8), atol=0.02)
    # shrinkage 1: an isotropic scaling, so inner products of centred vectors keep their order
    iso = postprocess.fit_whitening(xb, shrinkage=1.0)
    gram = iso["proj"] @ iso["proj"].T
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(8), atol=1e-5)
    out = postprocess.apply_whitening(postprocess.fit_whitening(xb, shrinkage=0.5, dim=4), xb[:10])
    assert out.shape == (10, 4) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(CopyscanError):
        postprocess.fit_whitening(xb, shrinkage=1.5)


def test_background_bias_and_normalised_scores_by_hand():
    xq = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    angles = np.array([0.1, 0.2, 0.3, 0.4, 1.4])
    xbg = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    bias = postprocess.background_bias(xq, xbg)
    # query 0: the three nearest are cos(0.1), cos(0.2), cos(0.3); query 1: sin(1.4), sin(0.4), sin(0.3)
    np.testing.assert_allclose(
        bias, [np.cos([0.1, 0.2, 0.3]).mean(), np.sin([1.4, 0.4, 0.3]).mean()], rtol=1e-6
    )
    np.testing.assert_allclose(postprocess.background_bias(xq, xbg, ranks=(2, 2)), [np.cos(0.2), np.sin(0.4)])
    D = np.array([[0.9, 0.5], [0.8, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(postprocess.normalised_scores(D, bias), D - bias[:, None], rtol=1e-6)
    with pytest.raises(CopyscanError):
        postprocess.background_bias(xq, xbg, ranks=(1, 6))


def test_learned_whitening_suppresses_the_directions_copies_move_along():
    """Images are random directions; a copy moves mostly along two fixed 'nuisance' axes. After whitening learned
    from pairs, a copy is nearer its source than before, measured on images not used for learning."""
    rng = np.random.default_rng(0)
    d = 16
    nuisance = np.zeros((2, d))
    nuisance[0, 0] = nuisance[1, 1] = 1.0

    def unit(v):
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def copies(x):
        return unit(x + rng.normal(size=(len(x), 2)) @ nuisance * 1.5 + rng.normal(size=x.shape) * 0.05)

    sample, database = unit(rng.normal(size=(500, d))), unit(rng.normal(size=(300, d)))
    params = postprocess.fit_learned_whitening(sample, copies(sample), database, shrinkage=0.1)
    queries = copies(database[:100])
    before = (queries * database[:100]).sum(1).mean()
    xb, xq = postprocess.apply_whitening(params, database), postprocess.apply_whitening(params, queries)
    after = (xq * xb[:100]).sum(1).mean()
    assert after > before + 0.2
    assert ((xq @ xb.T).argmax(1) == np.arange(100)).mean() > (
        (queries @ database.T).argmax(1) == np.arange(100)
    ).mean()
    assert postprocess.fit_learned_whitening(sample, copies(sample), database, dim=4)["proj"].shape == (d, 4)
    with pytest.raises(CopyscanError):
        postprocess.fit_learned_whitening(sample, copies(sample)[:10], database)


def test_two_stage_whitening_is_learned_then_pca_of_the_result():
    rng = np.random.default_rng(3)
    xb = rng.standard_normal((400, 12)).astype(np.float32) * np.linspace(3, 0.2, 12, dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    x_aug = xb[:100] + 0.1 * rng.standard_normal((100, 12)).astype(np.float32)
    one = postprocess.fit_learned_whitening(xb[:100], x_aug, xb, shrinkage=0.3)
    two = postprocess.fit_learned_whitening(xb[:100], x_aug, xb, shrinkage=0.3, pca_shrinkage=0.0)
    assert "proj2" not in one and {"mean2", "proj2"} <= set(two)
    np.testing.assert_array_equal(two["proj"], one["proj"])
    first = postprocess.apply_whitening(one, xb)
    y = postprocess.apply_whitening(two, xb)
    expected = postprocess.apply_whitening(postprocess.fit_whitening(first, shrinkage=0.0), first)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # with no shrinkage the second stage fully decorrelates the (first-stage) database vectors
    centred = (first - two["mean2"]) @ two["proj2"]
    cov = centred.T @ centred / len(centred)
    np.testing.assert_allclose(cov, np.eye(12), atol=1e-3)
