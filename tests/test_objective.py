"""The stage-3 objective (pft.core.objective), defined once: hand-computed terms, the reduction,
leading dimensions, gradients that reach exactly what trains, the one stop rule, one set of defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pft.core.adaptation import (
    AdaptationData,
    AdaptationTrainer,
    AdaptConfig,
    Batch,
    Convergence,
    ModelParts,
    PFTAdaptation,
)
from pft.core.models import Classifier, ModelConfig, Translator
from pft.core.objective import PairOutputs, PFTObjective, ReferenceTargets
from pft.core.personalize import PersonalizeConfig
from pft.core.privacy import DPPFTAdaptation

EPS = 1e-5
L3 = math.log(3.0)
ONLY = {  # one term on at a time
    "consistency": {"lambda_consistency": 1.0, "lambda_style": 0.0, "lambda_neutral": 0.0},
    "style": {"lambda_consistency": 0.0, "lambda_style": 1.0, "lambda_neutral": 0.0},
    "neutral": {"lambda_consistency": 0.0, "lambda_style": 0.0, "lambda_neutral": 1.0},
}


def _outputs() -> tuple[PairOutputs, ReferenceTargets]:
    """Two frames, two classes, D = 2: p_a = [.75, .25] and [.5, .5]; p_b = [.5, .5] and [.75, .25]."""
    logits_a = torch.tensor([[L3, 0.0], [0.0, 0.0]])
    logits_b = torch.tensor([[0.0, 0.0], [L3, 0.0]])
    translated = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # mu [2, 4], variance [1, 4]
    targets = ReferenceTargets(mean=torch.tensor([0.0, 4.0]), std=torch.tensor([1.0, 1.0]))
    return PairOutputs(logits_a, logits_b, translated_a=translated), targets


# KL(p_b || p_a) per frame, by hand
KL_0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
KL_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
# smoothed CE to class 0 with eps = 0.5, K = 2: -(0.5) log p0 - (0.25)(log p0 + log p1)
NEU_0 = -0.5 * math.log(0.75) - 0.25 * (math.log(0.75) + math.log(0.25))
NEU_1 = -0.5 * math.log(0.5) - 0.25 * (2 * math.log(0.5))  # = log 2
# ||mu - mu_ref||^2 + ||sigma - sigma_ref||^2 over the batch
STYLE = (2.0**2 + 0.0) + (math.sqrt(1 + EPS) - 1) ** 2 + (math.sqrt(4 + EPS) - 1) ** 2
# per frame ||f - mu_ref||^2
REF_MEAN = [(1.0**2 + 2.0**2), (3.0**2 + 2.0**2)]


def test_each_term_hand_computed() -> None:
    outputs, targets = _outputs()
    objective = PFTObjective(
        lambda_consistency=1.0, lambda_style=1.0, lambda_neutral=1.0, neutral_smoothing=0.5
    )
    _, none = objective.per_sample("reference_mean").evaluate(outputs, targets, reduction="none")
    _, mean = objective.evaluate(outputs, targets, reduction="mean")
    assert none["consistency"].tolist() == pytest.approx([KL_0, KL_1], rel=1e-6)
    assert none["neutral"].tolist() == pytest.approx([NEU_0, NEU_1], rel=1e-6)
    assert none["style"].tolist() == pytest.approx(REF_MEAN, rel=1e-6)
    assert float(mean["consistency"]) == pytest.approx((KL_0 + KL_1) / 2, rel=1e-6)
    assert float(mean["neutral"]) == pytest.approx((NEU_0 + NEU_1) / 2, rel=1e-6)
    assert float(mean["style"]) == pytest.approx(STYLE, rel=1e-6)


def test_total_is_the_weighted_sum_and_zero_weights_drop_terms() -> None:
    outputs, targets = _outputs()
    objective = PFTObjective(
        lambda_consistency=0.5, lambda_style=0.2, lambda_neutral=3.0, neutral_smoothing=0.5
    )
    total, _ = objective.evaluate(outputs, targets)
    expected = 0.5 * (KL_0 + KL_1) / 2 + 0.2 * STYLE + 3.0 * (NEU_0 + NEU_1) / 2
    assert float(total) == pytest.approx(expected, rel=1e-6)
    # the shipped weights (style off by default), at the smoothing NEU_0 / NEU_1 were computed with
    shipped_total, shipped_terms = PFTObjective(neutral_smoothing=0.5).evaluate(outputs, targets)
    assert set(shipped_terms) == {"consistency", "neutral"}
    assert float(shipped_total) == pytest.approx(0.5 * (KL_0 + KL_1) / 2 + (NEU_0 + NEU_1) / 2, rel=1e-6)
    # no smoothing: the plain negative log-likelihood of the neutral class
    _, plain = PFTObjective(neutral_smoothing=0.0).evaluate(outputs, targets, reduction="none")
    assert plain["neutral"].tolist() == pytest.approx([-math.log(0.75), math.log(2.0)], rel=1e-6)
    # nothing active: zero, still on the graph (a backward pass works)
    logits = outputs.logits_a.clone().requires_grad_(True)
    idle = PFTObjective(lambda_consistency=0.0, lambda_neutral=0.0)
    zero, none = idle.evaluate(PairOutputs(logits, outputs.logits_b), targets)
    zero.backward()
    assert float(zero.detach()) == 0.0 and none == {} and logits.grad is not None


def test_reduction_none_is_per_frame_and_refuses_batch_terms() -> None:
    outputs, targets = _outputs()
    objective = PFTObjective(lambda_style=0.3)
    with pytest.raises(ValueError, match="couples the frames"):
        objective.evaluate(outputs, targets, reduction="none")
    per_frame = objective.per_sample("reference_mean")
    total_none, _ = per_frame.evaluate(outputs, targets, reduction="none")
    total_mean, _ = per_frame.evaluate(outputs, targets, reduction="mean")
    assert total_none.shape == (2,)
    assert float(total_mean) == pytest.approx(float(total_none.mean()), rel=1e-6)
    dropped, terms = objective.per_sample("drop").evaluate(outputs, targets, reduction="none")
    assert "style" not in terms and dropped.shape == (2,)
    with pytest.raises(ValueError, match="reduction"):
        objective.evaluate(outputs, targets, reduction="sum")  # type: ignore[arg-type]


def test_missing_outputs_and_targets_are_clear_errors() -> None:
    outputs, targets = _outputs()
    no_frames = PairOutputs(outputs.logits_a, outputs.logits_b)
    with pytest.raises(ValueError, match="batch_stats"):
        PFTObjective(lambda_style=1.0).evaluate(no_frames, targets)
    with pytest.raises(ValueError, match="targets"):
        PFTObjective(lambda_style=1.0).evaluate(outputs, None)
    # given batch statistics stand in for the frames
    mu, sigma = outputs.batch_statistics()
    stats_only = PairOutputs(outputs.logits_a, outputs.logits_b, batch_mean=mu, batch_std=sigma)
    _, terms = PFTObjective(**ONLY["style"]).evaluate(stats_only, targets)
    assert float(terms["style"]) == pytest.approx(STYLE, rel=1e-6)


def test_stacked_subjects_equal_the_per_subject_loop() -> None:
    g = torch.Generator().manual_seed(0)
    m, b, k, d = 4, 6, 3, 5
    stacked = PairOutputs(
        torch.randn(m, b, k, generator=g),
        torch.randn(m, b, k, generator=g),
        torch.randn(m, b, d, generator=g),
    )
    targets = ReferenceTargets(torch.randn(m, d, generator=g), torch.rand(m, d, generator=g) + 0.5)
    objective = PFTObjective(lambda_style=0.4, neutral_smoothing=0.3)
    total, terms = objective.evaluate(stacked, targets)
    per_frame, _ = objective.per_sample("reference_mean").evaluate(stacked, targets, reduction="none")
    assert total.shape == (m,) and per_frame.shape == (m, b)
    for i in range(m):
        one = PairOutputs(stacked.logits_a[i], stacked.logits_b[i], stacked.translated_a[i])  # type: ignore[index]
        ref = ReferenceTargets(targets.mean[i], targets.std[i])
        t_i, terms_i = objective.evaluate(one, ref)
        torch.testing.assert_close(total[i], t_i)
        for name, value in terms_i.items():
            torch.testing.assert_close(terms[name][i], value)
        p_i, _ = objective.per_sample("reference_mean").evaluate(one, ref, reduction="none")
        torch.testing.assert_close(per_frame[i], p_i)


def test_reference_targets_stack_select_and_move() -> None:
    a = ReferenceTargets(torch.zeros(3), torch.ones(3))
    b = ReferenceTargets(torch.full((3,), 2.0), torch.full((3,), 3.0))
    both = ReferenceTargets.stack([a, b])
    assert both.mean.shape == (2, 3) and torch.equal(both.std[1], b.std)
    picked = both.select(torch.tensor([1]))
    assert torch.equal(picked.mean, b.mean.unsqueeze(0))
    assert both.to("cpu").mean.dtype == torch.float32


# --- gradients reach exactly the trainable parameters ----------------------------------------------
CFG = ModelConfig(width=8, translator_hidden=32, style_embed_dim=8)


def _parts() -> ModelParts:
    torch.manual_seed(0)
    translator, classifier = Translator(CFG), Classifier(CFG).eval()
    nn.init.normal_(translator.out.weight, std=0.05)  # past the identity start: every layer has gradient
    d = CFG.pooled_dim
    return ModelParts(
        classifier,
        translator,
        None,
        torch.randn(CFG.style_dim),
        torch.randn(CFG.style_dim),
        ReferenceTargets(torch.randn(d), torch.rand(d) + 0.5),
    )


@pytest.mark.parametrize("term", sorted(ONLY))
@pytest.mark.parametrize(("bias_only", "last_layers"), [(True, None), (False, 1), (False, None)])
@pytest.mark.parametrize("dp", [False, True])
def test_gradients_reach_exactly_the_trainable_parameters(
    term: str, bias_only: bool, last_layers: int | None, dp: bool
) -> None:
    parts = _parts()
    assert parts.translator is not None
    method = PFTAdaptation(PFTObjective(**ONLY[term]), bias_only=bias_only, last_layers=last_layers)
    trainable = {id(p) for p in method.trainable_parameters(parts)}
    for p in parts.translator.parameters():
        p.requires_grad_(id(p) in trainable)
    for p in parts.classifier.parameters():
        p.requires_grad_(False)
    parts.translator.train()
    f = torch.randn(16, CFG.pooled_dim, generator=torch.Generator().manual_seed(1)) + 1.0
    batch = Batch(f, f.flip(0), None, torch.arange(16), torch.Generator().manual_seed(2))
    loss, terms = (DPPFTAdaptation(method) if dp else method).loss(parts, batch)
    assert set(terms) == {term}
    loss.backward()
    for name, p in parts.translator.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name
    assert all(p.grad is None for p in parts.classifier.parameters())


# --- the one stop rule -------------------------------------------------------------------------------
def test_convergence_against_a_hand_computed_sequence() -> None:
    cfg = AdaptConfig(ema_beta=0.5, window=2, tol=0.1, min_iterations=3, max_iterations=100)
    # EMA: 10, 9, 8.5, 8.25; step 3: |8.5 - 10| = 1.5 > 0.1 * 10; step 4: |8.25 - 9| = 0.75 <= 0.9
    rule = Convergence(cfg)
    assert [rule.observe(v) for v in (10.0, 8.0, 8.0, 8.0)] == [False, False, False, True]
    assert rule.ema == [10.0, 9.0, 8.5, 8.25]
    # not before min_iterations: step 5 compares 8.125 with 8.5 (0.375 <= 0.85)
    late = Convergence(cfg.model_copy(update={"min_iterations": 5}))
    assert [late.observe(v) for v in (10.0, 8.0, 8.0, 8.0, 8.0)] == [False] * 4 + [True]
    # and never before the window is full, whatever min_iterations says
    early = Convergence(cfg.model_copy(update={"min_iterations": 1, "tol": 10.0}))
    assert [early.observe(v) for v in (1.0, 1.0, 1.0)] == [False, False, True]


def test_the_trainer_stops_where_the_rule_says() -> None:
    cfg = AdaptConfig(max_iterations=60, min_iterations=5, window=3, tol=0.005, batch_size=8, lr=0.01)
    method = PersonalizeConfig().method()
    f = torch.randn(30, CFG.pooled_dim, generator=torch.Generator().manual_seed(3)) + 1.0
    result = AdaptationTrainer(cfg).fit(method, _parts(), AdaptationData(f))
    rule = Convergence(cfg)
    stops = [rule.observe(v) for v in result.history["loss"]]
    assert result.converged and 5 < result.iterations < 60  # stopped by the rule, after min_iterations
    assert stops[-1] and not any(stops[:-1])


# --- one set of defaults -------------------------------------------------------------------------------
def test_the_shipped_defaults_live_in_one_place() -> None:
    # PFTAdaptation takes every setting from its caller: no second set of defaults
    fields = {f.name: f for f in dataclasses.fields(PFTAdaptation)}
    for name in ("objective", "bias_only", "last_layers"):
        assert fields[name].default is dataclasses.MISSING, name
    shipped = PersonalizeConfig().method()
    assert shipped.objective == PFTObjective() and shipped.bias_only and shipped.last_layers is None
    assert (shipped.objective.lambda_consistency, shipped.objective.lambda_style) == (0.5, 0.0)
    assert (shipped.objective.lambda_neutral, shipped.objective.neutral_smoothing) == (1.0, 0.6)
