"""Pairing of source subjects and reference matching, on hand-made descriptors."""

from __future__ import annotations

import numpy as np
import pytest

from pft.core.pairing import match_reference, pair_subjects


def test_cosine_pairs_by_direction_not_length() -> None:
    d = {
        "a": np.array([1.0, 0.0]),
        "b": np.array([10.0, 1.0]),  # nearly a's direction, far in distance
        "c": np.array([0.0, 1.0]),
        "d": np.array([0.1, 0.9]),
    }
    assert pair_subjects(d, "cosine") == {"a": "b", "b": "a", "c": "d", "d": "c"}


def test_landmark_pairs_by_z_scored_distance() -> None:
    # dimension 1 has a 1000x larger scale; z-scoring keeps it from dominating
    d = {
        "a": np.array([0.0, 0.0]),
        "b": np.array([0.1, 1000.0]),
        "c": np.array([1.0, 0.0]),
        "d": np.array([1.1, 1000.0]),
    }
    pairs = pair_subjects(d, "landmark")
    assert pairs == {"a": "c", "b": "d", "c": "a", "d": "b"}
    # a case where z-scoring changes the answer: unscaled, a is nearer b (3) than c (4)
    d2 = {
        "a": np.array([0.0, 0.0]),
        "b": np.array([0.0, 3.0]),
        "c": np.array([4.0, 0.0]),
        "e": np.array([20.0, 3.0]),
    }
    # z-scored: dim0 std sqrt(68) ~ 8.2, dim1 std 1.5 -> a-c 0.49, a-b 2.0
    assert pair_subjects(d2, "landmark")["a"] == "c"


def test_random_pairing_is_seeded_and_never_self() -> None:
    d = {f"s{i}": np.zeros(3) for i in range(7)}
    p1, p2 = pair_subjects(d, "random", seed=3), pair_subjects(d, "random", seed=3)
    assert p1 == p2 and all(k != v for k, v in p1.items()) and set(p1) == set(d)
    assert any(pair_subjects(d, "random", seed=s) != p1 for s in range(4, 10))


def test_pairing_needs_two_subjects_and_a_known_strategy() -> None:
    with pytest.raises(ValueError):
        pair_subjects({"a": np.zeros(2)}, "cosine")
    with pytest.raises(ValueError):
        pair_subjects({"a": np.ones(2), "b": np.ones(2)}, "euclid")  # type: ignore[arg-type]


def test_match_reference_may_pick_any_source_and_checks_dimensions() -> None:
    src = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    assert match_reference(np.array([0.2, 0.9]), src, "cosine") == "b"
    assert match_reference(np.array([0.9, 0.1]), src, "landmark") == "a"
    assert match_reference(np.zeros(2), src, "random", seed=1) in src
    with pytest.raises(ValueError):
        match_reference(np.zeros(3), src, "cosine")
