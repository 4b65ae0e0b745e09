"""Macro-F1 (percent) and accuracy against hand-computed values and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pft.core.metrics import accuracy, confusion_matrix, macro_f1


def test_macro_f1_hand_computed() -> None:
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    # class 0: tp 2, fp 0, fn 1 -> 2*2/(3+2) = 0.8; class 1: tp 1, fp 1, fn 1 -> 0.5;
    # class 2: tp 1, fp 1, fn 0 -> 2/3
    assert macro_f1(y_true, y_pred, 3) == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_skips_classes_absent_from_both_sides() -> None:
    # class 2 never occurs nor is predicted: averaged over classes 0 and 1 only (as sklearn)
    assert macro_f1([0, 1, 1], [0, 1, 0], 3) == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)
    # a class predicted but never true counts with F1 = 0
    assert macro_f1([0, 0], [0, 1], 2) == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_macro_f1_agrees_with_sklearn_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        t = rng.integers(0, k, 40)
        p = rng.integers(0, k, 40)
        expected = 100 * f1_score(t, p, average="macro", zero_division=0)
        assert macro_f1(t, p, k) == pytest.approx(expected)


def test_accuracy_and_confusion_matrix() -> None:
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 75.0
    cm = confusion_matrix([0, 1, 1], [1, 1, 0], 2)
    assert cm.tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        accuracy([], [])
