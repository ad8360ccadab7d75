"""DeLong's AUC covariance and tests for models scored on the same rows (plain numpy).

The AUC of scores X (positives, m of them) against Y (negatives, n) is the Mann–Whitney statistic
θ = (1/mn) Σ_i Σ_j ψ(X_i, Y_j), ψ = 1 if X_i > Y_j, ½ on a tie, 0 below. DeLong, DeLong & Clarke-Pearson
(Biometrics 1988) write it through each row's *placement*: V10(X_i) = (1/n) Σ_j ψ(X_i, Y_j) for a positive,
V01(Y_j) = (1/m) Σ_i ψ(X_i, Y_j) for a negative (θ is the mean of either), and estimate the covariance of the
AUCs of K models on the same rows as S = S10/m + S01/n, S10 and S01 the sample covariances (ddof 1) of the
models' placements over positives and over negatives. Sun & Xu (IEEE SPL 2014) get every placement from
midranks in O(N log N) per model instead of the O(mn) pairs: V10(X_i) = (T_Z(X_i) − T_X(X_i))/n and
V01(Y_j) = 1 − (T_Z(Y_j) − T_Y(Y_j))/m, T_X, T_Y, T_Z the midranks within X, within Y and within both.

A contrast L·θ (a difference of two AUCs, a mean over seeds minus another) has variance L S L^T; computed
here as the variance of the contrast's own placements Σ_k L_k V_k, one model at a time, so memory stays
O(N) whatever the number of models. Tests are two-sided, on the normal approximation DeLong et al. use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of 0.975: two-sided 95 % intervals


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the mean of the ranks they span (float64)."""
    x = np.asarray(x)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    first = np.ones(n, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)  # exclusive
    out = np.empty(n, dtype=np.float64)
    out[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)
    return out


def _split(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one row each (1-d), got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positive = labels.astype(bool)
    m = int(positive.sum())
    if m < 2 or len(labels) - m < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives, got {m} and {len(labels) - m}")
    return positive


def placements(labels: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10 over the positives, V01 over the negatives) of one model's `scores` (Sun & Xu's midranks)."""
    positive = _split(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != positive.shape:
        raise ValueError(f"scores must have one value per row ({positive.shape[0]}), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    x, y = scores[positive], scores[~positive]
    m, n = len(x), len(y)
    tz = midranks(np.concatenate([x, y]))
    v10 = (tz[:m] - midranks(x)) / n
    v01 = 1.0 - (tz[m:] - midranks(y)) / m
    auc = float(tz[:m].sum() / (m * n) - (m + 1) / (2.0 * n))
    return auc, v10, v01


@dataclass(frozen=True)
class DeLong:
    """AUCs of K models on the same rows and their covariance (K × K)."""

    auc: np.ndarray
    cov: np.ndarray
    positives: int
    negatives: int


def delong(labels: np.ndarray, *scores: np.ndarray) -> DeLong:
    """Every model's AUC and DeLong's covariance S = S10/m + S01/n of the AUCs."""
    if not scores:
        raise ValueError("delong needs at least one model's scores")
    parts = [placements(labels, s) for s in scores]
    v10 = np.stack([p[1] for p in parts])
    v01 = np.stack([p[2] for p in parts])
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLong(np.array([p[0] for p in parts]), cov, m, n)


@dataclass(frozen=True)
class Contrast:
    """A linear combination Σ_k w_k AUC_k of models on the same rows: its value, DeLong variance, 95 % interval
    and the two-sided p of `value == 0`."""

    value: float
    variance: float

    @property
    def se(self) -> float:
        return math.sqrt(max(self.variance, 0.0))

    @property
    def low(self) -> float:
        return self.value - Z95 * self.se

    @property
    def high(self) -> float:
        return self.value + Z95 * self.se

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.value / self.se
        return 0.0 if self.value == 0 else math.copysign(math.inf, self.value)

    @property
    def p(self) -> float:
        """Two-sided p of the normal approximation (1 when value and variance are both 0)."""
        return math.erfc(abs(self.z) / math.sqrt(2.0))

    def __add__(self, other: Contrast) -> Contrast:
        """The sum of two contrasts on *independent* rows: values and variances add."""
        return Contrast(self.value + other.value, self.variance + other.variance)


def contrast(labels: np.ndarray, scores: Sequence[np.ndarray], weights: Sequence[float]) -> Contrast:
    """Σ_k w_k AUC_k of the models scored on these rows, with DeLong's variance w S w^T, computed as the
    variance of the weighted placements (one model held at a time). Weights summing to 0 compare models
    (e.g. +1, −1: paired DeLong test of two AUCs); weights summing to 1 average them (with its interval)."""
    if len(scores) != len(weights) or not scores:
        raise ValueError(f"contrast needs one weight per model, got {len(scores)} models, {len(weights)} weights")
    value, w10, w01 = 0.0, None, None
    for s, w in zip(scores, weights):
        auc, v10, v01 = placements(labels, s)
        value += w * auc
        w10 = w * v10 if w10 is None else w10 + w * v10
        w01 = w * v01 if w01 is None else w01 + w * v01
    m, n = len(w10), len(w01)
    variance = float(np.var(w10, ddof=1) / m + np.var(w01, ddof=1) / n)
    return Contrast(float(value), variance)


def auc_interval(labels: np.ndarray, scores: np.ndarray) -> Contrast:
    """One model's AUC with its DeLong variance (`.low`, `.high`: the 95 % interval)."""
    return contrast(labels, [scores], [1.0])


def paired_test(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> Contrast:
    """AUC(a) − AUC(b) on the same rows: DeLong's paired test (`.p`), with its 95 % interval."""
    return contrast(labels, [a, b], [1.0, -1.0])
