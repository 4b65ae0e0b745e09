"""Baseline losses (SHOT, NRC, TPDS, neutral normalisation) on tiny hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from pft.core.baselines import (
    NeutralNorm,
    iic_loss,
    information_maximisation,
    neutral_normalise,
    nrc_loss,
    nrc_neighbours,
    shot_pseudo_labels,
    tpds_confidence,
    tpds_search,
)


def _bank(degrees: list[float]) -> torch.Tensor:
    a = torch.tensor(degrees) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_shot_information_maximisation_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    ent, div = information_maximisation(probs.log(), eps=0.0)
    # H(.5,.5) = ln 2 = 0.693147; H(.9,.1) = 0.325083; mean prediction (.7,.3): .7 ln .7 + .3 ln .3
    assert float(ent) == pytest.approx((0.693147 + 0.325083) / 2, abs=1e-5)
    assert float(div) == pytest.approx(-0.610864, abs=1e-5)


def test_shot_diversity_is_lowest_for_balanced_predictions() -> None:
    _, collapsed = information_maximisation(torch.tensor([[0.9, 0.1], [0.9, 0.1]]).log(), eps=0.0)
    _, balanced = information_maximisation(torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log(), eps=0.0)
    assert float(balanced) == pytest.approx(-math.log(2), abs=1e-6) and float(collapsed) > float(balanced)


def test_shot_pseudo_labels_follow_clusters_not_argmax() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])  # the last is mislabelled
    assert shot_pseudo_labels(features, probs).tolist() == [0, 0, 1, 1]
    # a class nobody predicts (argmax) is no candidate (threshold 0)
    one_class = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.6, 0.4]])
    assert shot_pseudo_labels(features, one_class).tolist() == [0, 0, 0, 0]


def test_nrc_affinity_on_a_four_point_bank() -> None:
    bank = _bank([0, 10, 30, 90])  # a, b, c, d on the unit circle
    near, weight, near_near, weight_nn = nrc_neighbours(bank, bank[[0, 2]], torch.tensor([0, 2]), 1, 1)
    # a's nearest is b and b's nearest is a: reciprocal (1); c's nearest is b, b's is a: r = 0.1
    assert near.tolist() == [[1], [1]] and torch.allclose(weight, torch.tensor([[1.0], [0.1]]))
    assert near_near.tolist() == [[0], [0]] and torch.allclose(weight_nn, torch.full((2, 1), 0.1))
    scores = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.3, 0.7], [0.0, 1.0]])
    probs = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    l_n, l_e = nrc_loss(probs, scores, near, weight, near_near, weight_nn)
    # L_N = -mean(1 * S_b.p_a, 0.1 * S_b.p_c) = -mean(0.56, 0.05); L_E = -mean(.1*S_a.p_a, .1*S_a.p_c)
    assert float(l_n) == pytest.approx(-0.305, abs=1e-6)
    assert float(l_e) == pytest.approx(-0.055, abs=1e-6)


def test_nrc_neighbours_with_k2_counts_reciprocity_per_neighbour() -> None:
    bank = _bank([0, 10, 30, 90])
    near, weight, _, _ = nrc_neighbours(bank, bank[[1]], torch.tensor([1]), 2, 1)
    # b's neighbours: a (a's nearest is b: reciprocal) and c (c's nearest is b: reciprocal)
    assert near.tolist() == [[0, 2]] and torch.equal(weight, torch.ones(1, 2))


def test_iic_is_minus_mutual_information() -> None:
    assert float(iic_loss(torch.eye(2), torch.eye(2))) == pytest.approx(-math.log(2), abs=1e-6)
    uniform = torch.full((3, 2), 0.5)
    assert float(iic_loss(uniform, uniform)) == pytest.approx(0.0, abs=1e-6)


def test_tpds_confidence_hand_computed() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    distance = torch.tensor([0.1, 0.5, 0.2, 0.05])
    # top-2 entropy: 1, 3; 2 nearest their centroid: 3, 0 -> only 1 is unconfident
    assert tpds_confidence(probs, distance).tolist() == [True, False, True, True]


def test_tpds_search_walks_to_the_first_confident_frame() -> None:
    bank = _bank([0, 10, 30, 90])
    # only d is confident: a->b->c->d, b->a->c->d, c->b->a->d; d finds none -> its first step, c
    assert tpds_search(bank, torch.tensor([False, False, False, True])).tolist() == [3, 3, 3, 2]
    # all confident: each frame's nearest other frame
    assert tpds_search(bank, torch.ones(4, dtype=torch.bool)).tolist() == [1, 0, 1, 2]


def test_neutral_normalise_hand_computed_and_matches_reference_statistics() -> None:
    out = neutral_normalise(
        torch.tensor([[2.0, 4.0]]),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])),
        (torch.tensor([0.0, 10.0]), torch.tensor([2.0, 1.0])),
    )
    assert out.tolist() == [[2.0, 11.0]]
    g = torch.Generator().manual_seed(0)
    neutral = torch.randn(200, 3, generator=g) * 4 + 7
    ref = (torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 0.5, 2.0]))
    method = NeutralNorm.from_neutral(neutral, ref)
    moved = neutral_normalise(neutral, method.person, method.reference)
    assert torch.allclose(moved.mean(0), ref[0], atol=1e-4)
    assert torch.allclose(moved.std(0, unbiased=False), ref[1], atol=1e-3)
