"""The benchmark's statistics against hand-computed values: the bootstrap CI, the Wilcoxon
signed-rank test (exact, with zeros, with ties, normal approximation), the gap share, wins/ties/
losses, per-class F1, and the seed protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pft.core.metrics import confusion_matrix, macro_f1
from pft.simulations.protocol import TEST_SEEDS, VALIDATION_SEEDS, seed_role, split_by_role
from pft.simulations.stats import (
    bootstrap_mean_ci,
    gap_share,
    paired_wilcoxon,
    per_class_f1,
    win_tie_loss,
)


# --- bootstrap ------------------------------------------------------------------------------------
def test_bootstrap_ci_of_a_hand_enumerated_case() -> None:
    # values [0, 0, 0, 0, 10]: a resample's mean is 2 * X with X ~ Binomial(5, 1/5) (how many times
    # the 10 is drawn). P(X = 0) = 0.328 > 2.5 %, so the 2.5 % quantile is 0; P(X <= 2) = 0.942 and
    # P(X <= 3) = 0.993, so the 97.5 % quantile is 2 * 3 = 6.
    assert bootstrap_mean_ci([0, 0, 0, 0, 10]) == (0.0, 6.0)


def test_bootstrap_ci_of_two_values_is_their_range() -> None:
    # two values: resample means a (1/4), (a+b)/2 (1/2), b (1/4); both tails hold more than 2.5 %
    assert bootstrap_mean_ci([60.0, 80.0]) == (60.0, 80.0)


def test_bootstrap_ci_is_seeded_and_contains_the_mean() -> None:
    values = np.random.default_rng(3).normal(70, 10, size=30)
    low, high = bootstrap_mean_ci(values, seed=1)
    assert low < values.mean() < high
    assert bootstrap_mean_ci(values, seed=1) == (low, high)
    # the normal-theory interval of the mean is a close neighbour for 30 normal values
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(values.mean() - 1.96 * se, abs=0.6 * se)
    assert high == pytest.approx(values.mean() + 1.96 * se, abs=0.6 * se)


def test_bootstrap_ci_degenerate_cases() -> None:
    assert all(math.isnan(v) for v in bootstrap_mean_ci([50.0]))
    assert bootstrap_mean_ci([33.3, 33.3, 33.3]) == (33.3, 33.3)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])


# --- Wilcoxon signed-rank -----------------------------------------------------------------------------
def test_wilcoxon_exact_without_ties() -> None:
    # d = 1..5 all positive: W- = 0; of the 2^5 equally likely sign patterns only "all +" gives
    # W- = 0, so the two-sided p = 2 / 32
    test = paired_wilcoxon([11, 12, 13, 14, 15], [10, 10, 10, 10, 10])
    assert (test.statistic, test.p_value, test.n, test.n_nonzero, test.method) == (0.0, 0.0625, 5, 5, "exact")


def test_wilcoxon_drops_zeros_then_exact() -> None:
    # d = [1, -2, 3, 4, 0, 5]: the zero is dropped; ranks 1..5, W- = 2. Subsets of {1..5} with a
    # rank sum <= 2: {}, {1}, {2} -> P(W- <= 2) = 3/32, two-sided 6/32
    x = [11, 8, 13, 14, 10, 15]
    test = paired_wilcoxon(x, [10] * 6)
    assert test.n == 6 and test.n_nonzero == 5 and test.method == "exact"
    assert test.statistic == 2.0 and test.p_value == pytest.approx(6 / 32)


def test_wilcoxon_differences_below_the_tie_tolerance_are_zeros() -> None:
    a = paired_wilcoxon([11, 8, 13, 14, 10.004, 15], [10] * 6)  # 0.004 < 0.005: a zero
    b = paired_wilcoxon([11, 8, 13, 14, 10, 15], [10] * 6)
    assert a == b


def test_wilcoxon_with_ties_enumerates_every_sign_flip() -> None:
    # d = [1, 1, -1, 2, 3]: |d| ranks (average for ties) 2, 2, 2, 4, 5; W+ = 13, W- = 2, total 15.
    # Under H0 each of the 32 sign patterns is equally likely. As extreme as observed: W+ <= 2
    # ({} or one of the three 2s: 4 patterns) or W+ >= 13 (the mirror images: 4) -> p = 8/32.
    test = paired_wilcoxon([1, 1, -1, 2, 3], [0, 0, 0, 0, 0])
    assert test.method == "enumerated" and test.statistic == 2.0
    assert test.p_value == pytest.approx(8 / 32)


def test_wilcoxon_normal_approximation_with_tie_correction() -> None:
    # n = 17 with ties -> the normal approximation. |d|: six 1s (ranks 1-6, mean 3.5), six 2s
    # (7-12, 9.5), three 3s (13-15, 14; negative), two 4s (16-17, 16.5). W- = 42, W+ = 111.
    d = [1] * 6 + [2] * 6 + [-3] * 3 + [4] * 2
    n = len(d)
    mean = n * (n + 1) / 4  # 76.5
    ties = [6, 6, 3, 2]
    var = n * (n + 1) * (2 * n + 1) / 24 - sum(t**3 - t for t in ties) / 48  # 446.25 - 9.375
    z = (42 - mean) / math.sqrt(var)
    expected = math.erfc(abs(z) / math.sqrt(2))  # two-sided 2 * Phi(-|z|)
    test = paired_wilcoxon(d, [0] * n)
    assert test.method == "normal" and test.statistic == 42.0
    assert test.p_value == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.0988, abs=1e-4)


def test_wilcoxon_all_equal_has_nothing_to_rank() -> None:
    test = paired_wilcoxon([33.3, 40.0, 50.0], [33.3, 40.0, 50.0])
    assert (test.p_value, test.n_nonzero, test.method) == (1.0, 0, "none")


def test_wilcoxon_is_symmetric() -> None:
    x, y = [70.0, 72.5, 61.0, 90.0, 55.5, 66.0], [65.0, 70.0, 63.0, 80.0, 50.0, 66.0]
    assert paired_wilcoxon(x, y).p_value == paired_wilcoxon(y, x).p_value
    with pytest.raises(ValueError, match="same units"):
        paired_wilcoxon([1.0, 2.0], [1.0])


# --- gap share, wins/ties/losses, per-class F1 --------------------------------------------------------
def test_gap_share_by_hand() -> None:
    assert gap_share(75.0, 65.0, 85.0) == 0.5
    assert gap_share(85.0, 65.0, 85.0) == 1.0
    assert gap_share(65.0, 65.0, 85.0) == 0.0
    assert gap_share(60.0, 65.0, 85.0) == -0.25
    assert math.isnan(gap_share(70.0, 65.0, 64.0))  # the oracle below source-only: no gap
    assert math.isnan(gap_share(70.0, 65.0, 65.5))  # a gap under MIN_GAP (1 point)
    assert gap_share(70.0, 65.0, 65.5, min_gap=0.1) == pytest.approx(10.0)


def test_win_tie_loss_by_hand() -> None:
    assert win_tie_loss([1.0, 2.0, 3.004, 5.0], [2.0, 2.0, 3.0, 4.0]) == (1, 2, 1)


def test_per_class_f1_by_hand() -> None:
    f1 = per_class_f1([[3, 1], [2, 4]])
    # class 0: 2*3 / (4 true + 5 predicted); class 1: 2*4 / (6 true + 5 predicted)
    assert f1 == pytest.approx([100 * 6 / 9, 100 * 8 / 11])
    assert math.isnan(per_class_f1([[5, 0, 0], [1, 4, 0], [0, 0, 0]])[2])  # class 2: never seen


def test_per_class_f1_averages_to_macro_f1() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 3, size=40)  # class 3 of 4 never occurs in y, sometimes in the prediction
        p = np.where(rng.random(40) < 0.6, y, rng.integers(0, 4, size=40))
        cm = confusion_matrix(y, p, 4)
        assert float(np.nanmean(per_class_f1(cm))) == pytest.approx(macro_f1(y, p, 4))


# --- the seed protocol --------------------------------------------------------------------------------
def test_seed_roles() -> None:
    assert [seed_role(s) for s in TEST_SEEDS] == ["test"] * 3
    assert [seed_role(s) for s in VALIDATION_SEEDS] == ["validation"] * 3
    assert seed_role(99) == "test" and seed_role(100) == "validation"
    assert split_by_role([101, 2, 100, 0]) == {"test": (0, 2), "validation": (100, 101)}
    assert split_by_role([1]) == {"test": (1,)}
    with pytest.raises(ValueError):
        seed_role(-1)
