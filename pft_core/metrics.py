"""Evaluation metrics, in PERCENT as the paper's tables report them."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError("y_true and y_pred must be non-empty and of the same length")
    return t, p


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    t, p = _labels(y_true, y_pred)
    if t.min() < 0 or p.min() < 0 or t.max() >= num_classes or p.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Macro-averaged F1 in percent.

    The average runs over the classes present in ``y_true`` or ``y_pred`` (as scikit-learn's
    ``f1_score(average="macro")`` with its default labels): a class that a person never shows and
    the model never predicts is not counted as F1 = 0. A class with no true and no predicted
    samples is thus skipped; one present on one side only has F1 = 0.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    f1 = np.where(present, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    return float(100.0 * f1[present].mean())


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of correct predictions, in percent."""
    t, p = _labels(y_true, y_pred)
    return float(100.0 * (t == p).mean())
