"""The oracle (supervised fine-tuning of F's last block and C) and the block split of F it uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pft.core.adaptation import (
    AdaptationData,
    AdaptationTrainer,
    AdaptConfig,
    Batch,
    ModelParts,
    TranslatorSupervision,
)
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, Translator, preprocess
from pft.core.oracle import (
    OracleConfig,
    SupervisedFineTuning,
    fine_tune_oracle,
    frozen_outputs,
)


@pytest.mark.parametrize("feature_dim", [None, 96])
def test_forward_from_after_forward_to_is_forward(feature_dim: int | None) -> None:
    torch.manual_seed(0)
    extractor = FeatureExtractor(ModelConfig(width=8, feature_dim=feature_dim)).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        whole = extractor(x)
        for last, first in (("layer2", "layer3"), ("layer3", "layer4")):
            torch.testing.assert_close(extractor.forward_from(extractor.forward_to(x, last), first), whole)


def test_block_parameters_are_the_tail_of_f() -> None:
    extractor = FeatureExtractor(ModelConfig(width=8, feature_dim=96))
    tail = {id(p) for p in extractor.block_parameters("layer4")}
    expected = {id(p) for p in extractor.layer4.parameters()} | {id(p) for p in extractor.embed.parameters()}  # type: ignore[union-attr]
    assert tail == expected
    assert len(extractor.block_parameters("layer3")) > len(extractor.block_parameters("layer4"))


def test_classifier_oracle_trains_c_alone() -> None:
    cfg = ModelConfig(width=8)
    parts = ModelParts(classifier=Classifier(cfg))
    method = SupervisedFineTuning("classifier")
    trainable = {id(p) for p in method.trainable_parameters(parts)}
    assert trainable == {id(p) for p in parts.classifier.parameters()}
    feats = torch.randn(4, cfg.pooled_dim)
    batch = Batch(feats, feats, torch.tensor([0, 1, 0, 1]), torch.arange(4), torch.Generator())
    loss, _ = method.loss(parts, batch)
    loss.backward()
    assert all(p.grad is not None for p in parts.classifier.parameters())


def test_oracle_gradient_reaches_exactly_fs_last_block_and_c() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=8)
    extractor, classifier = FeatureExtractor(cfg), Classifier(cfg)
    method = SupervisedFineTuning("layer4")
    parts = ModelParts(classifier=classifier, extractor=extractor)
    maps = extractor.eval().forward_to(torch.rand(6, 3, 64, 64) * 2 - 1, "layer3").detach()
    batch = Batch(maps, maps, torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6), torch.Generator())
    loss, terms = method.loss(parts, batch)
    loss.backward()
    trainable = {id(p) for p in method.trainable_parameters(parts)}
    for module in (extractor, classifier):
        for name, p in module.named_parameters():
            reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert reached == (id(p) in trainable), name
    assert set(terms) == {"ce"}


def _two_class_crops(n: int, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """Class 1 has a bright square in the upper left; class 0 does not (plus noise)."""
    labels = np.arange(n) % 2
    crops = rng.integers(60, 120, size=(n, 32, 32, 3)).astype(np.uint8)
    crops[labels == 1, 4:14, 4:14] = 230
    return crops, torch.as_tensor(labels)


def test_oracle_learns_a_persons_labels_and_leaves_the_source_model_untouched() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(width=8, image_size=32)
    extractor, classifier = FeatureExtractor(cfg).eval(), Classifier(cfg).eval()
    before = {k: v.clone() for k, v in {**extractor.state_dict(), **classifier.state_dict()}.items()}
    train, y_train = _two_class_crops(64, rng)
    test, y_test = _two_class_crops(32, rng)
    n_c = sum(p.numel() for p in classifier.parameters())
    n_layer4 = sum(p.numel() for p in extractor.layer4.parameters())
    adapt = {"max_iterations": 60, "min_iterations": 60, "lr": 3e-3, "batch_size": 32}
    for tail, augmented, n_params in (
        ("layer4", False, n_layer4 + n_c),
        ("layer4", True, n_layer4 + n_c),
        ("classifier", False, n_c),
        ("classifier", True, n_c),
    ):
        config = OracleConfig(first_block=tail, augment=augmented, adapt=adapt)
        out = fine_tune_oracle(extractor, classifier, train, y_train, test, config, seed=0)
        accuracy = float((out.logits.argmax(1) == y_test).float().mean())
        assert accuracy >= 0.9, (tail, augmented)
        assert out.result.iterations == 60 and out.trainable_parameters == n_params
        after = {**extractor.state_dict(), **classifier.state_dict()}
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_outputs_are_eval_mode_maps_or_features_even_from_a_training_f() -> None:
    torch.manual_seed(0)
    extractor = FeatureExtractor(ModelConfig(width=8))
    crops = np.random.default_rng(1).integers(0, 255, size=(5, 64, 64, 3)).astype(np.uint8)
    extractor.train()  # the frozen part must still use the source BatchNorm statistics
    maps = frozen_outputs(extractor, crops, "layer4", batch_size=2)
    pooled = frozen_outputs(extractor, crops, "classifier", batch_size=2)
    assert extractor.training and all(m.training for m in extractor.modules())
    extractor.eval()
    with torch.no_grad():
        torch.testing.assert_close(maps, extractor.forward_to(preprocess(crops, 64), "layer3"))
        torch.testing.assert_close(pooled, extractor(preprocess(crops, 64)))


def test_oracle_refuses_mismatched_labels() -> None:
    cfg = ModelConfig(width=8, image_size=32)
    crops = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="labelled crops"):
        fine_tune_oracle(
            FeatureExtractor(cfg), Classifier(cfg), crops, torch.tensor([0, 1]), crops, OracleConfig(), seed=0
        )


def test_adaptation_data_accepts_feature_maps() -> None:
    data = AdaptationData(features=torch.rand(4, 2, 3, 3), labels=torch.tensor([0, 1, 0, 1]))
    batch = data.sample(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert batch.features.shape == (3, 2, 3, 3)


# --- oracle_bias: the reach of bias-only stage 3 --------------------------------------------------
def test_oracle_bias_loss_and_gradient_by_hand() -> None:
    """Fresh T (output layer zero) is ``f + out.bias``; with C's logits ``[x_0 + b_0, ln 3]`` at
    f = 0, b = 0 and label 0: p = (1/4, 3/4), CE = ln 4 and dCE/db = (p_0 - 1, 0, ...) = (-3/4, 0...)."""
    cfg = ModelConfig(width=8, num_classes=2)
    translator, classifier = Translator(cfg).eval(), Classifier(cfg).eval()
    with torch.no_grad():
        classifier.fc.weight.zero_()
        classifier.fc.weight[0, 0] = 1.0
        classifier.fc.bias.copy_(torch.tensor([0.0, float(np.log(3.0))]))
    codes = torch.zeros(cfg.style_dim)
    parts = ModelParts(
        classifier=classifier, translator=translator, style_target=codes, style_reference=codes
    )
    f = torch.zeros(1, cfg.pooled_dim)
    batch = Batch(f, f, torch.tensor([0]), torch.arange(1), torch.Generator())
    loss, terms = TranslatorSupervision(name="oracle_bias", bias_only=True).loss(parts, batch)
    assert loss.item() == pytest.approx(np.log(4.0), abs=1e-6) and terms["ce"] == pytest.approx(
        np.log(4.0), abs=1e-6
    )
    loss.backward()
    expected = torch.zeros(cfg.pooled_dim)
    expected[0] = -0.75
    assert translator.out.bias.grad is not None
    torch.testing.assert_close(translator.out.bias.grad, expected)


def test_oracle_bias_training_changes_only_ts_output_bias() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(width=8)
    translator, classifier = Translator(cfg), Classifier(cfg)
    torch.nn.init.normal_(
        translator.out.weight, std=0.05
    )  # a trained-looking T0: gradients reach every layer
    codes = torch.randn(cfg.style_dim)
    parts = ModelParts(
        classifier=classifier, translator=translator, style_target=codes, style_reference=-codes
    )
    before = {
        n: p.detach().clone()
        for m in (translator, classifier)
        for n, p in m.named_parameters(prefix=type(m).__name__)
    }
    feats = torch.randn(32, cfg.pooled_dim)
    data = AdaptationData(feats, labels=torch.arange(32) % cfg.num_classes)
    cfg_adapt = AdaptConfig(max_iterations=5, min_iterations=5, batch_size=16, lr=1e-2, seed=0)
    AdaptationTrainer(cfg_adapt).fit(TranslatorSupervision(name="oracle_bias", bias_only=True), parts, data)
    for m in (translator, classifier):
        for n, p in m.named_parameters(prefix=type(m).__name__):
            changed = not torch.equal(p.detach(), before[n])
            assert changed == (p is translator.out.bias), n
