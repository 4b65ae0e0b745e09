"""The statistics of a comparison of methods over subject-seeds (``pft benchmark``, ``pft simulate``).

The unit is a **subject-seed**: one target person of one cohort seed (each cohort seed renders
new people, so subject ``S078`` of seed 0 and of seed 1 are two different persons). Every method
is scored once per unit (macro-F1 in percent on the person's held-out ``eval`` frames), so two
methods' scores are paired by unit.

- :func:`bootstrap_mean_ci`: the percentile bootstrap confidence interval of the mean over units
  (``scipy.stats.bootstrap``, 10,000 resamples, seeded: the same numbers give the same interval).
- :func:`paired_wilcoxon`: the two-sided Wilcoxon signed-rank test of the paired differences.
  Zeros and ties, as chosen here: a difference smaller than ``TIE_TOLERANCE`` (0.005 F1 points,
  i.e. equal at the tables' two decimals) is a zero and is dropped before ranking (Wilcoxon's
  original rule, scipy's ``zero_method="wilcox"``); tied absolute differences get their average
  rank. The p-value is exact when it can be: the exact null distribution without ties (up to 50
  non-zero differences), the complete enumeration of all ``2**n`` sign flips with ties (the exact
  conditional distribution, up to 16), else the normal approximation with the tie correction and
  no continuity correction. With no non-zero difference the test has nothing to rank: ``p = 1``.
- :func:`gap_share`: the share of the source-to-oracle gap a method recovers,
  ``(method - source) / (oracle - source)`` on the means over the same units; undefined (NaN)
  when the oracle is less than ``MIN_GAP`` F1 points above source-only.
- :func:`win_tie_loss`: per unit, better / equal (within ``TIE_TOLERANCE``) / worse.
- :func:`per_class_f1`: per-class F1 from a confusion matrix, consistent with
  ``pft.core.metrics.macro_f1`` (a class with no true and no predicted frame is undefined, NaN,
  and left out of the macro average).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

TIE_TOLERANCE = 0.005
"""Two F1 scores closer than this (in F1 points) are equal: a tie, and a zero difference."""

MIN_GAP = 1.0
"""The gap share is reported only when the oracle is at least this many F1 points above source-only."""

BOOTSTRAP_RESAMPLES = 10_000
"""Bootstrap resamples of the confidence intervals."""

EXACT_NO_TIES_MAX = 50
"""Largest number of non-zero differences for the exact null distribution (no ties)."""

ENUMERATE_TIES_MAX = 16
"""Largest number of non-zero differences for which, with ties, all sign flips are enumerated."""


def bootstrap_mean_ci(
    values: ArrayLike,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Parameters
    ----------
    values:
        One score per unit (e.g. macro-F1 per subject-seed); NaNs are not allowed.
    confidence:
        Confidence level, e.g. 0.95.
    resamples:
        Bootstrap resamples (units drawn with replacement, as many as there are).
    seed:
        Seed of the resampling (same values and seed, same interval).

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` for fewer than two values (no spread to resample).
    """
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(data).any():
        raise ValueError("bootstrap_mean_ci: values contain NaN")
    if len(data) < 2:
        return float("nan"), float("nan")
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = bootstrap(
        (data,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class PairedTest:
    """A two-sided Wilcoxon signed-rank test of ``x - y`` over paired units.

    ``statistic`` is ``min(W+, W-)`` (sums of the ranks of the positive and negative differences);
    ``n`` the pairs, ``n_nonzero`` those ranked (not a zero); ``method`` how ``p_value`` was
    computed: ``exact`` (no ties), ``enumerated`` (ties; all sign flips), ``normal`` (normal
    approximation with tie correction) or ``none`` (nothing to rank, ``p = 1``).
    """

    statistic: float
    p_value: float
    n: int
    n_nonzero: int
    method: Literal["exact", "enumerated", "normal", "none"]

    def as_dict(self) -> dict[str, Any]:
        """The test as a JSON-ready dict."""
        return asdict(self)


def paired_differences(x: ArrayLike, y: ArrayLike, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """``x - y`` per unit, rounded to 4 decimals (results.json's precision); ``|d| < tolerance`` is 0."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same units: {a.shape} vs {b.shape}")
    d = np.round(a - b, 4)
    d[np.abs(d) < tolerance] = 0.0
    return d


def paired_wilcoxon(x: ArrayLike, y: ArrayLike, tolerance: float = TIE_TOLERANCE) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of the paired scores ``x`` against ``y``.

    Parameters
    ----------
    x, y:
        Scores of two methods on the same units, in the same order.
    tolerance:
        Differences smaller than this are zeros (dropped before ranking).

    Returns
    -------
    PairedTest
        Statistic, p-value, counts and the method used (see the module docstring).
    """
    from scipy.stats import PermutationMethod, wilcoxon

    d = paired_differences(x, y, tolerance)
    nonzero = d[d != 0.0]
    n = len(nonzero)
    if n == 0:
        return PairedTest(0.0, 1.0, len(d), 0, "none")
    has_ties = len(np.unique(np.abs(nonzero))) < n
    method: Literal["exact", "enumerated", "normal"]
    if not has_ties and n <= EXACT_NO_TIES_MAX:
        method, how = "exact", "exact"
    elif has_ties and n <= ENUMERATE_TIES_MAX:
        method, how = "enumerated", PermutationMethod(n_resamples=np.inf)
    else:
        method, how = "normal", "asymptotic"
    result = wilcoxon(nonzero, zero_method="wilcox", correction=False, alternative="two-sided", method=how)
    return PairedTest(float(result.statistic), float(min(1.0, result.pvalue)), len(d), n, method)


def gap_share(method_mean: float, source_mean: float, oracle_mean: float, min_gap: float = MIN_GAP) -> float:
    """Share of the source-to-oracle gap a method recovers: ``(m - s) / (o - s)``.

    1 means as good as the oracle, 0 no better than source-only, negative worse than source-only.
    NaN when ``o - s < min_gap`` (no gap to recover: the oracle is no upper bound there).
    """
    gap = oracle_mean - source_mean
    if not np.isfinite(gap) or gap < min_gap:
        return float("nan")
    return float((method_mean - source_mean) / gap)


def win_tie_loss(x: ArrayLike, y: ArrayLike, tolerance: float = TIE_TOLERANCE) -> tuple[int, int, int]:
    """Units where ``x`` beats ``y``, ties it (within ``tolerance``) and loses to it."""
    d = paired_differences(x, y, tolerance)
    return int((d > 0).sum()), int((d == 0).sum()), int((d < 0).sum())


def per_class_f1(confusion: ArrayLike) -> np.ndarray:
    """Per-class F1 in percent from a (K, K) confusion matrix (rows true, columns predicted).

    A class with no true and no predicted frame is NaN (as ``macro_f1`` skips it), so
    ``np.nanmean(per_class_f1(cm)) == macro_f1(...)`` for the frames that made ``cm``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    tp = np.diag(cm)
    denominator = cm.sum(0) + cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 200.0 * tp / denominator, np.nan)
    return f1


def nanmean_columns(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Column means ignoring NaN (NaN where a column has no value), without numpy's empty-slice warning."""
    stacked = np.vstack(rows) if rows else np.empty((0, 0))
    counts = (~np.isnan(stacked)).sum(0)
    sums = np.nansum(stacked, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
