"""DeLong's AUC covariance (umec_lightning/report/delong.py) against brute force: the Mann–Whitney AUC over every
(positive, negative) pair, the placements and their covariance from the pairwise kernel, a case whose variance
has a closed form, and the spread of AUCs over repeated samples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from umec_lightning.report.delong import auc_interval, contrast, delong, midranks, paired_test, placements


def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ψ(X_i, Y_j) for every pair: 1 above, ½ tied, 0 below (m × n)."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def brute_auc(labels, scores) -> float:
    pos = labels.astype(bool)
    return float(kernel(scores[pos], scores[~pos]).mean())


def brute_delong(labels, *scores) -> tuple[np.ndarray, np.ndarray]:
    pos = labels.astype(bool)
    ks = [kernel(s[pos], s[~pos]) for s in scores]
    v10 = np.stack([k.mean(axis=1) for k in ks])  # per positive: share of negatives below (ties ½)
    v01 = np.stack([k.mean(axis=0) for k in ks])  # per negative: share of positives above
    m, n = pos.sum(), (~pos).sum()
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return np.array([k.mean() for k in ks]), cov


def test_midranks_match_counting():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 2.0])
    expected = [(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x]
    np.testing.assert_array_equal(midranks(x), expected)  # e.g. the three 3.0 share ranks 5, 6, 7 -> 6


def test_auc_and_covariance_match_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.3).astype(np.uint8)
    # Three correlated models; integer scores force many ties (the ½ of the Mann–Whitney statistic).
    base = rng.normal(size=400) + labels
    scores = [np.round(base + rng.normal(scale=s, size=400)) for s in (0.3, 1.0, 2.0)]
    fast = delong(labels, *scores)
    auc, cov = brute_delong(labels, *scores)
    np.testing.assert_allclose(fast.auc, auc, atol=1e-12)
    np.testing.assert_allclose(fast.cov, cov, atol=1e-14)
    for s, a in zip(scores, auc):
        assert placements(labels, s)[0] == pytest.approx(brute_auc(labels, s), abs=1e-12)
        assert auc_interval(labels, s).value == pytest.approx(a, abs=1e-12)
    # The paired test's variance is var(a) + var(b) − 2 cov(a, b), not the unpaired sum.
    pair = paired_test(labels, scores[0], scores[1])
    assert pair.value == pytest.approx(auc[0] - auc[1], abs=1e-12)
    assert pair.variance == pytest.approx(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], rel=1e-9)
    assert pair.variance < cov[0, 0] + cov[1, 1]  # correlated models: pairing on the rows removes shared noise
    # A mean over models: w S w^T with w = 1/K.
    mean = contrast(labels, scores, [1 / 3] * 3)
    w = np.full(3, 1 / 3)
    assert mean.value == pytest.approx(auc.mean()) and mean.variance == pytest.approx(w @ cov @ w, rel=1e-9)


def test_binary_scores_have_the_closed_form_variance():
    """A 0/1 score: AUC = (sensitivity + specificity)/2, each positive's placement is (1 + spec)/2 or spec/2 and
    each negative's (1 + sens)/2 or sens/2, so var = sens(1−sens)/(4(m−1)) + spec(1−spec)/(4(n−1))."""
    labels = np.array([1] * 40 + [0] * 60)
    scores = np.array([1] * 30 + [0] * 10 + [1] * 15 + [0] * 45, dtype=float)  # sens 30/40, spec 45/60
    sens, spec, m, n = 0.75, 0.75, 40, 60
    interval = auc_interval(labels, scores)
    assert interval.value == pytest.approx((sens + spec) / 2)
    assert interval.variance == pytest.approx(sens * (1 - sens) / (4 * (m - 1)) + spec * (1 - spec) / (4 * (n - 1)))
    assert interval.low == pytest.approx(0.75 - 1.959964 * math.sqrt(interval.variance), abs=1e-6)


def test_variance_matches_the_spread_over_repeated_samples():
    """Binormal rows drawn 400 times: DeLong's variance, averaged, is the variance of the AUCs (and of a paired
    difference) across the draws, within Monte Carlo error (±20 %)."""
    rng = np.random.default_rng(1)
    aucs, diffs, var_auc, var_diff = [], [], [], []
    for _ in range(400):
        labels = (rng.random(300) < 0.4).astype(np.uint8)
        signal = rng.normal(size=300) + 1.0 * labels
        a = signal + rng.normal(scale=0.5, size=300)
        b = signal + rng.normal(scale=0.8, size=300)
        one, pair = auc_interval(labels, a), paired_test(labels, a, b)
        aucs.append(one.value)
        var_auc.append(one.variance)
        diffs.append(pair.value)
        var_diff.append(pair.variance)
    assert np.mean(var_auc) == pytest.approx(np.var(aucs, ddof=1), rel=0.2)
    assert np.mean(var_diff) == pytest.approx(np.var(diffs, ddof=1), rel=0.2)


def test_paired_test_of_a_model_against_itself_and_against_a_better_one():
    rng = np.random.default_rng(2)
    labels = (rng.random(2000) < 0.3).astype(np.uint8)
    a = rng.normal(size=2000) + labels
    same = paired_test(labels, a, 1 / (1 + np.exp(-a)))  # a monotone transform: the same ranking
    assert same.value == 0 and same.variance == pytest.approx(0, abs=1e-18) and same.p == 1.0
    better = a + 2 * labels
    test = paired_test(labels, a, better)
    assert test.value < 0 and test.p < 1e-6 and test.high < 0
    flipped = paired_test(labels, better, a)
    assert flipped.value == pytest.approx(-test.value) and flipped.p == pytest.approx(test.p)


def test_independent_rows_add_and_bad_input_is_refused():
    rng = np.random.default_rng(3)
    labels = (rng.random(200) < 0.5).astype(np.uint8)
    a, b = rng.normal(size=200) + labels, rng.normal(size=200)
    one, two = paired_test(labels, a, b), paired_test(labels, b, a)
    both = one + two
    assert both.value == pytest.approx(0) and both.variance == pytest.approx(2 * one.variance)
    with pytest.raises(ValueError, match="at least 2 positives and 2 negatives"):
        auc_interval(np.array([1, 0, 0, 0]), np.arange(4.0))
    with pytest.raises(ValueError, match="0 or 1"):
        auc_interval(np.array([1, 2, 0, 0, 1]), np.arange(5.0))
    with pytest.raises(ValueError, match="one value per row"):
        auc_interval(labels, a[:10])
    with pytest.raises(ValueError, match="finite"):
        auc_interval(labels, np.where(labels == 1, np.nan, a))
