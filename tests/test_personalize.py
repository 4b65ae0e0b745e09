"""Stage 3 as the SDK, the Flower client and the simulations call it (pft.core.personalize)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pft.core.adaptation import ModelParts
from pft.core.errors import TooFewFacesError
from pft.core.models import Classifier, ModelConfig, StyleNormalizer, Translator
from pft.core.pairing import match_references
from pft.core.personalize import PersonalizeConfig, SourceModel, personalize
from pft.core.training import SourceStyles

CFG = ModelConfig(width=8, num_classes=2, translator_hidden=32, style_embed_dim=8)


def _source_model(pairing: str = "cosine") -> SourceModel:
    torch.manual_seed(0)
    d, s = CFG.pooled_dim, CFG.style_dim
    styles = SourceStyles()
    descriptors = {}
    for k in range(6):
        name = f"S{k}"
        styles.codes[name] = torch.full((s,), float(k))
        styles.neutral_mean[name] = torch.full((d,), float(k))
        styles.neutral_std[name] = torch.ones(d)
        descriptors[name] = np.eye(d)[k]  # cosine pairing compares mean neutral features (D dims)
    translator = Translator(CFG)
    torch.nn.init.normal_(translator.out.weight, std=0.01)  # not the identity, so T's weights matter
    return SourceModel(
        Classifier(CFG).eval(), translator.eval(), StyleNormalizer(s), styles, descriptors, pairing
    )  # type: ignore[arg-type]


def test_match_references_orders_by_similarity_and_caps_k() -> None:
    sources = {"a": np.array([1.0, 0.0]), "b": np.array([0.7, 0.7]), "c": np.array([0.0, 1.0])}
    assert match_references(np.array([1.0, 0.1]), sources, "cosine", 2) == ["a", "b"]
    assert match_references(np.array([0.1, 1.0]), sources, "cosine", 1) == ["c"]
    assert sorted(match_references(np.zeros(2), sources, "random", 10, seed=3)) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        match_references(np.zeros(2), sources, "cosine", 0)


def test_neutral_calibration_has_its_fixed_point_at_the_smoothed_target() -> None:
    # K=2, eps=0.4: target p(neutral) = 1 - 0.4 + 0.4/2 = 0.8; logits (ln 4, 0) give exactly p = (0.8, 0.2)
    logits = torch.tensor([[math.log(4.0), 0.0]], requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.4)
    loss.backward()
    assert loss.item() == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), abs=1e-6)
    assert logits.grad is not None and torch.allclose(logits.grad, torch.zeros(1, 2), atol=1e-6)


def test_bias_only_trains_exactly_the_output_bias() -> None:
    model = _source_model()
    parts = ModelParts(
        model.classifier, model.translator, None, torch.zeros(CFG.style_dim), torch.zeros(CFG.style_dim)
    )
    assert PersonalizeConfig().method().trainable_parameters(parts) == [model.translator.out.bias]


def test_personalize_changes_only_the_bias_of_a_copy_and_averages_k_references() -> None:
    model = _source_model()
    before_t = {k: v.clone() for k, v in model.translator.state_dict().items()}
    before_c = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    base = torch.zeros(CFG.pooled_dim)
    base[1], base[3], base[4] = 3.0, 2.0, 1.0  # most like S1, then S3, then S4
    features = base + 0.05 * torch.randn(40, CFG.pooled_dim)
    stats = torch.rand(40, 2 * sum(CFG.tap_channels))
    config = PersonalizeConfig(reference_k=3, adapt={"max_iterations": 15, "min_iterations": 15, "lr": 0.05})
    result = personalize(model, features, stats, config, video_ids=torch.arange(40) // 10)
    # the source model is untouched (it serves other people)
    assert all(torch.equal(v, model.translator.state_dict()[k]) for k, v in before_t.items())
    assert all(torch.equal(v, model.classifier.state_dict()[k]) for k, v in before_c.items())
    changed = [k for k, v in result.translator.state_dict().items() if not torch.equal(v, before_t[k])]
    assert changed == ["out.bias"]
    refs = ["S1", "S3", "S4"]
    expected = torch.stack([model.styles.codes[r] for r in refs]).mean(0)
    assert result.reference_subject == refs[0]
    assert torch.equal(result.style_reference, expected)


def test_personalize_refuses_too_few_frames() -> None:
    model = _source_model()
    with pytest.raises(TooFewFacesError, match="at least 8"):
        personalize(
            model,
            torch.randn(3, CFG.pooled_dim),
            torch.rand(3, 2 * sum(CFG.tap_channels)),
            PersonalizeConfig(),
        )
