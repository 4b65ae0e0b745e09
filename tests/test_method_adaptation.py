"""The adaptation trainer and its methods: what is frozen stays bit-identical, seeds reproduce."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pft.core.adaptation import (
    AdaptationData,
    AdaptationTrainer,
    AdaptConfig,
    ModelParts,
    Oracle,
    PFTAdaptation,
    SourceOnly,
    adapt_translator,
    predict,
)
from pft.core.errors import TooFewFacesError
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, Translator
from pft.core.objective import PFTObjective, ReferenceTargets

CFG = ModelConfig(width=8, translator_hidden=64, style_embed_dim=8)
FAST = AdaptConfig(max_iterations=12, min_iterations=12, batch_size=16, lr=1e-2, seed=0)
#: every term of the stage-3 objective on, all of T trained
EVERY_TERM = PFTObjective(lambda_consistency=1.0, lambda_style=0.1, lambda_neutral=0.1, neutral_smoothing=0.0)
FULL_T = PFTAdaptation(EVERY_TERM, bias_only=False, last_layers=None)


def _parts(with_extractor: bool = True) -> ModelParts:
    torch.manual_seed(0)
    t = Translator(CFG)
    nn.init.normal_(t.out.weight, std=0.05)  # a pretrained-like T0 (not the identity start)
    d = CFG.pooled_dim
    return ModelParts(
        classifier=Classifier(CFG),
        translator=t,
        extractor=FeatureExtractor(CFG) if with_extractor else None,
        style_target=torch.randn(CFG.style_dim),
        style_reference=torch.randn(CFG.style_dim),
        targets=ReferenceTargets(torch.randn(d), torch.rand(d) + 0.5),
    )


def _data(n: int = 30, labels: bool = False) -> AdaptationData:
    g = torch.Generator().manual_seed(1)
    f = torch.randn(n, CFG.pooled_dim, generator=g) + 1.0
    y = (torch.arange(n) % 2) if labels else None
    return AdaptationData(
        features=f, labels=y, video_ids=torch.arange(n) // 10, time_index=torch.arange(n) % 10
    )


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pft_adaptation_changes_t_only_and_restores_state() -> None:
    parts = _parts()
    assert parts.extractor is not None and parts.translator is not None
    f0, c0, t0 = _snapshot(parts.extractor), _snapshot(parts.classifier), _snapshot(parts.translator)
    result = AdaptationTrainer(FAST).fit(FULL_T, parts, _data())
    assert _same(_snapshot(parts.extractor), f0)
    assert _same(_snapshot(parts.classifier), c0)
    assert not _same(_snapshot(parts.translator), t0)
    assert result.iterations == 12 and set(result.history) == {"loss", "consistency", "style", "neutral"}
    assert all(p.requires_grad for m in parts.modules() for p in m.parameters())  # restored
    assert not any(m.training for m in parts.modules())


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (FULL_T, {"translator"}),
        (PFTAdaptation(EVERY_TERM, bias_only=False, last_layers=1), {"translator.out"}),
        (PFTAdaptation(EVERY_TERM, bias_only=True, last_layers=None), {"translator.out.bias"}),
        (Oracle(), {"translator", "classifier"}),
    ],
)
def test_only_intended_parameters_receive_gradients(method: object, expected: set[str]) -> None:
    parts = _parts()
    named = {
        f"{prefix}.{n}": p
        for prefix, m in (
            ("extractor", parts.extractor),
            ("translator", parts.translator),
            ("classifier", parts.classifier),
        )
        if m is not None
        for n, p in m.named_parameters()
    }
    seen: list[dict[str, bool]] = []

    def hook(params: list[nn.Parameter]) -> None:
        seen.append({n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in named.items()})

    cfg = FAST.model_copy(update={"max_iterations": 2, "min_iterations": 2})
    AdaptationTrainer(cfg, grad_hook=hook).fit(method, parts, _data(labels=True))  # type: ignore[arg-type]
    for name, has_grad in seen[-1].items():
        intended = any(name == e or name.startswith(e + ".") for e in expected)
        assert has_grad == intended, name


def test_same_seed_same_result_other_seed_differs() -> None:
    runs = []
    for seed in (0, 0, 1):
        parts = _parts(with_extractor=False)
        cfg = FAST.model_copy(update={"seed": seed})
        res = AdaptationTrainer(cfg).fit(FULL_T, parts, _data())
        assert parts.translator is not None
        runs.append((_snapshot(parts.translator), res.history["loss"]))
    assert _same(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not _same(runs[0][0], runs[2][0])


def test_source_only_is_c_of_f_and_trains_nothing() -> None:
    parts = _parts(with_extractor=False)
    f = torch.randn(5, CFG.pooled_dim)
    result = AdaptationTrainer(FAST).fit(SourceOnly(), parts, _data())
    assert result.iterations == 0
    parts.classifier.eval()
    torch.testing.assert_close(predict(SourceOnly(), parts, f), parts.classifier(f).detach())


def test_oracle_fits_labels_and_updates_c() -> None:
    parts = _parts(with_extractor=False)
    data = _data(60, labels=True)
    data.features[data.labels == 1] += 2.0  # a learnable signal
    c0 = _snapshot(parts.classifier)
    cfg = AdaptConfig(max_iterations=80, min_iterations=80, batch_size=32, lr=1e-2)
    AdaptationTrainer(cfg).fit(Oracle(), parts, data)
    assert not _same(_snapshot(parts.classifier), c0)
    acc = (predict(Oracle(), parts, data.features).argmax(1) == data.labels).float().mean()
    assert float(acc) > 0.9


def test_convergence_stops_early_when_the_smoothed_loss_is_flat() -> None:
    parts = _parts(with_extractor=False)
    cfg = AdaptConfig(max_iterations=200, min_iterations=15, window=5, tol=10.0, batch_size=8)
    res = AdaptationTrainer(cfg).fit(FULL_T, parts, _data())
    assert res.converged and res.iterations == 15
    strict = cfg.model_copy(update={"tol": 0.0, "max_iterations": 20})
    res2 = AdaptationTrainer(strict).fit(FULL_T, _parts(False), _data())
    assert not res2.converged and res2.iterations == 20


def test_adapt_translator_returns_a_copy_and_leaves_base_t() -> None:
    parts = _parts(with_extractor=False)
    assert parts.translator is not None
    base = _snapshot(parts.translator)
    personal, res = adapt_translator(parts, _data().features, FAST, FULL_T)
    assert _same(_snapshot(parts.translator), base)
    assert not _same(_snapshot(personal), base) and res.method == "pft"


def test_too_few_frames_and_missing_styles_are_clear_errors() -> None:
    parts = _parts(with_extractor=False)
    with pytest.raises(TooFewFacesError):
        AdaptationTrainer(FAST).fit(FULL_T, parts, AdaptationData(torch.randn(1, CFG.pooled_dim)))
    bare = ModelParts(classifier=parts.classifier, translator=parts.translator)
    with pytest.raises(ValueError, match="style"):
        AdaptationTrainer(FAST).fit(FULL_T, bare, _data())


def test_partners_come_from_the_same_video_at_another_time() -> None:
    data = _data(30)
    idx = torch.arange(30)
    partner = data.partners(idx, torch.Generator().manual_seed(0))
    assert data.video_ids is not None and data.time_index is not None
    assert torch.equal(data.video_ids[partner], data.video_ids[idx])
    assert bool((data.time_index[partner] != data.time_index[idx]).all())


def test_privacy_seam_wraps_the_optimizer_and_grad_hook_acts_before_the_step() -> None:
    calls: list[str] = []

    class RecordingPrivacy:
        def make_private(self, parts, optimizer, data, config):  # type: ignore[no-untyped-def]
            calls.append("make_private")
            return parts, optimizer

    def zero_grads(params: list[nn.Parameter]) -> None:  # a degenerate "clip to zero"
        for p in params:
            assert p.grad is not None
            p.grad.zero_()

    parts = _parts(with_extractor=False)
    assert parts.translator is not None
    t0 = copy.deepcopy(_snapshot(parts.translator))
    AdaptationTrainer(FAST, privacy=RecordingPrivacy(), grad_hook=zero_grads).fit(FULL_T, parts, _data())
    assert calls == ["make_private"]
    assert _same(_snapshot(parts.translator), t0)  # Adam with zero gradients does not move
