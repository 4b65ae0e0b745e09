"""Losses of SFDA-PFT: hand-computed values, and gradients that reach what they train and nothing else."""

from __future__ import annotations

import math

import pytest
import torch

from pft.core.losses import (
    channel_stats,
    classification_loss,
    consistency_loss,
    expression_loss,
    style_loss,
)
from pft.core.models import Classifier, ModelConfig, Translator

EPS = 1e-5


def test_channel_stats_pooled_features_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mu, sigma = channel_stats(x)
    torch.testing.assert_close(mu, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(sigma, torch.tensor([math.sqrt(1 + EPS), math.sqrt(4 + EPS)]))


def test_channel_stats_feature_maps_over_batch_and_space() -> None:
    x = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]])  # (N=2, C=1, H=1, W=2)
    mu, sigma = channel_stats(x)
    torch.testing.assert_close(mu, torch.tensor([3.0]))
    torch.testing.assert_close(sigma, torch.tensor([math.sqrt(5 + EPS)]))  # (9+1+1+9)/4 = 5
    with pytest.raises(ValueError):
        channel_stats(torch.zeros(2, 3, 4))


def test_style_loss_hand_computed_with_precomputed_and_raw_references() -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mu [2, 4], sigma ~[1, 2]
    ref = (torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0]))
    expected = 4.0 + (math.sqrt(1 + EPS) - 1) ** 2 + (math.sqrt(4 + EPS) - 1) ** 2
    assert float(style_loss([t], [ref])) == pytest.approx(expected, rel=1e-6)
    # a raw reference layer: stats computed from it; two layers add up
    r = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # mu 0, sigma sqrt(eps)
    second = (
        4.0 + 16.0 + (math.sqrt(1 + EPS) - math.sqrt(EPS)) ** 2 + (math.sqrt(4 + EPS) - math.sqrt(EPS)) ** 2
    )
    assert float(style_loss([t, t], [ref, r])) == pytest.approx(expected + second, rel=1e-6)
    assert float(style_loss([t], [t.clone()])) == 0.0
    with pytest.raises(ValueError):
        style_loss([t], [])


def test_expression_loss_is_kl_of_probabilities_hand_computed() -> None:
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # p = [.5, .5]; second row equal to its translation
    tr = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])  # q = [.75, .25]
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(expression_loss(ref, tr)) == pytest.approx(kl / 2, rel=1e-6)  # batch mean
    # KL is not symmetric: arguments are (reference, translated)
    kl_rev = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(expression_loss(tr[:1], ref[:1])) == pytest.approx(kl_rev, rel=1e-6)
    # raw-logit shift invariance: proper probabilities, not logits treated as a distribution
    assert float(expression_loss(ref + 5.0, tr - 3.0)) == pytest.approx(kl / 2, rel=1e-5)


def test_classification_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert float(classification_loss(logits, torch.tensor([1]))) == pytest.approx(-math.log(0.75), rel=1e-6)


def test_consistency_loss_value_and_stop_gradient() -> None:
    a = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = consistency_loss(a, b)  # KL(p_b || p_a)
    assert float(loss.detach()) == pytest.approx(
        0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-6
    )
    loss.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert b.grad is None


def _t_and_c() -> tuple[Translator, Classifier, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(width=8, translator_hidden=32, style_embed_dim=8)
    t, c = Translator(cfg), Classifier(cfg).eval()
    torch.nn.init.normal_(t.out.weight, std=0.05)  # past the identity start, so all layers get gradient
    for p in c.parameters():
        p.requires_grad_(False)
    return t, c, cfg


def _assert_grads_reach_all(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("term", ["style", "expr", "ce", "consistency"])
def test_each_loss_trains_the_translator_and_nothing_else(term: str) -> None:
    t, c, cfg = _t_and_c()
    f = torch.randn(16, cfg.pooled_dim, requires_grad=True)  # stands for frozen F's output
    s_i, s_j = torch.randn(cfg.style_dim), torch.randn(cfg.style_dim)
    f_hat = t(f.detach(), s_i, s_j)
    if term == "style":
        loss = style_loss([f_hat], [(torch.randn(cfg.pooled_dim), torch.rand(cfg.pooled_dim) + 0.5)])
    elif term == "expr":
        loss = expression_loss(c(f), c(f_hat))
    elif term == "ce":
        loss = classification_loss(c(f_hat), torch.randint(2, (16,)))
    else:
        loss = consistency_loss(c(f_hat), c(t(f.detach() + 0.1, s_i, s_j)))
    loss.backward()
    _assert_grads_reach_all(t)
    assert all(p.grad is None for p in c.parameters())
    assert f.grad is None  # the reference/frozen path carries no gradient


def test_translator_identity_start_still_trains_its_output_layer() -> None:
    cfg = ModelConfig(width=8)
    t = Translator(cfg)
    f_hat = t(torch.randn(8, cfg.pooled_dim), torch.randn(cfg.style_dim), torch.randn(cfg.style_dim))
    style_loss([f_hat], [(torch.ones(cfg.pooled_dim), torch.ones(cfg.pooled_dim))]).backward()
    assert t.out.weight.grad is not None and float(t.out.weight.grad.abs().sum()) > 0
