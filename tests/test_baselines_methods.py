"""Baselines on the shared trainer: only T moves (C and F bit-identical), gradients reach T,
seeds reproduce; every registered runner runs on a tiny real F/T/C world; AdaBN re-estimates
exactly F's BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pft.core.adaptation import AdaptationData, AdaptationTrainer, AdaptConfig, ModelParts, predict
from pft.core.baselines import NRC, SHOT, TPDS, baseline_translator, reestimate_batchnorm
from pft.core.frames import FrameSet
from pft.core.methods import METHODS, MethodSettings, TargetData, TargetImages
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, Translator, preprocess
from pft.core.personalize import SourceModel
from pft.core.training import SubjectFeatures, extract_features, neutral_confidence, source_styles

CFG = ModelConfig(width=8, image_size=32, num_classes=2, translator_hidden=32, style_embed_dim=8)
FAST = AdaptConfig(max_iterations=12, min_iterations=12, batch_size=16, lr=1e-2, seed=0)
METHOD_CLASSES = [SHOT, NRC, TPDS]


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _parts(identity: bool = False) -> ModelParts:
    torch.manual_seed(0)
    t = Translator(CFG)
    if not identity:
        nn.init.normal_(t.out.weight, std=0.05)  # a pretrained-like T0
    return ModelParts(
        classifier=Classifier(CFG),
        translator=t,
        extractor=FeatureExtractor(CFG),
        style_target=torch.randn(CFG.style_dim),
        style_reference=torch.randn(CFG.style_dim),
    )


def _features(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, CFG.pooled_dim, generator=g) + 1.0


@pytest.mark.parametrize("cls", METHOD_CLASSES)
def test_baseline_updates_t_only(cls: type) -> None:
    parts = _parts()
    assert parts.extractor is not None and parts.translator is not None
    f0, c0, t0 = _snapshot(parts.extractor), _snapshot(parts.classifier), _snapshot(parts.translator)
    feats = _features()
    seen: list[set[int]] = []
    trainer = AdaptationTrainer(
        FAST, grad_hook=lambda ps: seen.append({id(p) for p in ps if p.grad is not None})
    )
    result = trainer.fit(cls(feats), parts, AdaptationData(feats))
    assert _same(_snapshot(parts.extractor), f0) and _same(_snapshot(parts.classifier), c0)
    assert not _same(_snapshot(parts.translator), t0)
    assert result.iterations == 12 and all(len(v) == 12 for v in result.history.values())
    t_ids = {id(p) for p in parts.translator.parameters()}
    assert seen and all(s == t_ids for s in seen)  # every T parameter got a gradient, every step
    assert all(p.grad is None for p in parts.classifier.parameters())
    assert all(p.grad is None for p in parts.extractor.parameters())


@pytest.mark.parametrize("cls", METHOD_CLASSES)
def test_baseline_gradient_is_nonzero_on_every_t_parameter(cls: type) -> None:
    parts = _parts()
    assert parts.translator is not None
    feats = _features()
    method = cls(feats)
    assert [id(p) for p in method.trainable_parameters(parts)] == [
        id(p) for p in parts.translator.parameters()
    ]
    data = AdaptationData(feats)
    batch = data.sample(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    loss, terms = method.loss(parts, batch)
    loss.backward()
    assert terms and torch.isfinite(loss)
    for name, p in parts.translator.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("cls", METHOD_CLASSES)
def test_baseline_is_deterministic_from_seed(cls: type) -> None:
    feats = _features()
    states = []
    for _ in range(2):
        parts = _parts()
        assert parts.translator is not None
        AdaptationTrainer(FAST).fit(cls(feats), parts, AdaptationData(feats))
        states.append(_snapshot(parts.translator))
    assert _same(states[0], states[1])


def test_identity_init_starts_at_the_source_model_and_leaves_t0_alone() -> None:
    parts = _parts()
    assert (
        parts.translator is not None and parts.style_target is not None and parts.style_reference is not None
    )
    t0 = _snapshot(parts.translator)
    t = baseline_translator(parts.translator, "identity")
    f = _features(8)
    assert torch.equal(t.eval()(f, parts.style_target, parts.style_reference), f)
    assert _same(_snapshot(parts.translator), t0)
    assert _same(_snapshot(baseline_translator(parts.translator, "pretrained")), t0)


def test_shot_diversity_pushes_neutral_only_data_off_neutral() -> None:
    """The failure mode the paper reports: on neutral-only data IM spreads predictions over classes."""
    parts = _parts(identity=True)
    with torch.no_grad():
        parts.classifier.fc.bias.copy_(torch.tensor([0.5, 0.0]))
    feats = _features(64) * 0.1
    before = predict(SHOT(feats), parts, feats).argmax(1)
    assert bool((before == 0).all())  # the source model calls everyone neutral
    cfg = AdaptConfig(max_iterations=60, min_iterations=60, batch_size=32, lr=1e-2, seed=0)
    AdaptationTrainer(cfg).fit(SHOT(feats, lambda_pseudo=0.0), parts, AdaptationData(feats))
    after = predict(SHOT(feats), parts, feats).argmax(1)
    assert float((after == 1).float().mean()) > 0.2


# --- runners on a tiny real world ----------------------------------------------------------------
def _crops(n: int, level: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 30, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)


def _frame_set(extractor: FeatureExtractor, crops: np.ndarray, labels: np.ndarray) -> FrameSet:
    f, s = extract_features(extractor, crops)
    n = len(crops)
    return FrameSet(f, s, torch.as_tensor(labels), torch.arange(n) // 8, torch.arange(n) % 8, None)


@pytest.fixture(scope="module")
def world() -> tuple[SourceModel, TargetData]:
    torch.manual_seed(0)
    extractor, classifier, translator = FeatureExtractor(CFG).eval(), Classifier(CFG).eval(), Translator(CFG)
    nn.init.normal_(translator.out.weight, std=0.05)
    translator.eval()
    subjects = {}
    for k in range(3):
        crops = _crops(24, 90 + 20 * k, k)
        f, s = extract_features(extractor, crops)
        subjects[f"s{k}"] = SubjectFeatures(f, s, torch.arange(24) % 2)
    normalizer, styles = source_styles(subjects)
    styles.neutral_confidence = neutral_confidence(classifier, subjects)
    descriptors = {n: sf.features[sf.neutral_mask].double().mean(0).numpy() for n, sf in subjects.items()}
    model = SourceModel(classifier, translator, normalizer, styles, descriptors, "cosine")
    adapt_crops, eval_crops, oracle_crops = _crops(24, 150, 10), _crops(16, 160, 11), _crops(16, 155, 12)
    target = TargetData(
        "t0",
        _frame_set(extractor, adapt_crops, np.zeros(24, dtype=np.int64)),
        _frame_set(extractor, oracle_crops, np.arange(16) % 2),
        _frame_set(extractor, eval_crops, np.arange(16) % 2),
        TargetImages(extractor, adapt_crops, eval_crops, oracle_crops),
    )
    return model, target


# the image-space rows (sfda_it, sfit, dsfda) train a generator through F: they run with small
# settings in tests/test_image_translation.py
@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("sfda_it", "sfit", "dsfda")])
def test_every_runner_runs_and_leaves_the_source_model_alone(
    world: tuple[SourceModel, TargetData], name: str
) -> None:
    model, target = world
    c0, t0 = _snapshot(model.classifier), _snapshot(model.translator)
    settings = MethodSettings().model_copy(
        update={
            k: getattr(MethodSettings(), k).model_copy(update={"adapt": FAST})
            for k in ("shot", "nrc", "tpds", "oracle")
        }
    )
    out = METHODS[name](model, target, settings, 3)
    assert out.logits.shape == (len(target.eval), CFG.num_classes) and torch.isfinite(out.logits).all()
    assert _same(_snapshot(model.classifier), c0) and _same(_snapshot(model.translator), t0)
    if name in ("shot", "nrc", "tpds"):
        assert out.iterations == 12 and out.trainable_parameters == model.translator.param_count()
    again = METHODS[name](model, target, settings, 3)
    assert torch.equal(out.logits, again.logits)  # same seed, same numbers


def test_adabn_runner_needs_crops(world: tuple[SourceModel, TargetData]) -> None:
    model, target = world
    bare = TargetData(target.subject, target.adapt, None, target.eval)
    with pytest.raises(ValueError, match="adabn needs the face crops"):
        METHODS["adabn"](model, bare, MethodSettings(), 0)


def test_adabn_reestimates_batchnorm_statistics_exactly(world: tuple[SourceModel, TargetData]) -> None:
    _, target = world
    assert target.images is not None
    extractor = target.images.extractor
    before = _snapshot(extractor)
    adapted = reestimate_batchnorm(extractor, target.images.adapt, batch_size=256)
    assert _same(_snapshot(extractor), before)  # the source F is untouched
    after = _snapshot(adapted)
    for key, value in before.items():
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(after[key], value), key  # every weight identical
    assert adapted.bn1.running_mean is not None and adapted.bn1.running_var is not None
    assert extractor.bn1.running_mean is not None
    with torch.no_grad():
        h = extractor.conv1(preprocess(target.images.adapt, CFG.image_size))
    assert torch.allclose(adapted.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(adapted.bn1.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4)
    assert not torch.allclose(adapted.bn1.running_mean, extractor.bn1.running_mean)
    assert not adapted.training and adapted.bn1.momentum == extractor.bn1.momentum
