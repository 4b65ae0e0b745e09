"""Stage 1 (train_source) and stage 2 (pretrain_translator) on tiny synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pft.core.models import Classifier, FeatureExtractor, ModelConfig
from pft.core.training import (
    SourceStyles,
    SourceTrainConfig,
    SubjectFeatures,
    TranslatorPretrainConfig,
    augment,
    extract_features,
    pretrain_translator,
    source_styles,
    train_source,
)

CFG = ModelConfig(width=8, image_size=32)


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    imgs = rng.integers(60, 120, (n, 32, 32, 3)).astype(np.uint8)
    imgs[labels == 1, 8:24, 8:24, :] = 230  # class 1: a bright square
    return imgs, labels


def synthetic_subjects(
    n_subjects: int, cfg: ModelConfig, n: int = 40, seed: int = 0
) -> dict[str, SubjectFeatures]:
    """Gaussian expression clusters under a per-person NON-additive identity (scale and offset)."""
    g = torch.Generator().manual_seed(seed)
    d, c = cfg.pooled_dim, cfg.stats_dim // 2
    centers = torch.randn(2, d, generator=g)
    proj = torch.randn(d, c, generator=g) / d**0.5
    out = {}
    for s in range(n_subjects):
        scale = torch.exp(0.4 * torch.randn(d, generator=g))
        offset = 0.5 * torch.randn(d, generator=g)
        y = torch.arange(n) % 2
        f = (centers[y] + 0.5 * torch.randn(n, d, generator=g)) * scale + offset
        m = torch.tanh(f @ proj)
        stats = torch.cat([m, m**2 + torch.nn.functional.softplus(f @ proj)], 1)
        out[f"s{s:02d}"] = SubjectFeatures(f, stats, y, 0, scale[:4].numpy().astype(np.float64))
    return out


def _frozen_classifier(cfg: ModelConfig) -> Classifier:
    torch.manual_seed(1)
    return Classifier(cfg).eval()


def test_augment_is_seeded_bounded_and_identity_when_off() -> None:
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    cfg = SourceTrainConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(0))
    b = augment(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= -1 and float(a.max()) <= 1 and not torch.allclose(a, x)
    off = SourceTrainConfig(brightness=0, contrast=0, translate=0, hflip=False, noise_std=0)
    assert torch.equal(augment(x, off, torch.Generator()), x)


def test_train_source_learns_and_is_deterministic() -> None:
    imgs, labels = _images(96, 0)
    cfg = SourceTrainConfig(epochs=3, batch_size=32, lr=5e-3, seed=7)
    f1, c1, hist = train_source(imgs, labels, CFG, cfg)
    f2, c2, _ = train_source(imgs, labels, CFG, cfg)
    for a, b in [(f1, f2), (c1, c2)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not f1.training and not c1.training
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
    test_imgs, test_labels = _images(40, 1)
    feats, stats = extract_features(f1, test_imgs)
    assert feats.shape == (40, CFG.pooled_dim) and stats.shape == (40, CFG.stats_dim)
    with torch.no_grad():
        acc = float((c1(feats).argmax(1).numpy() == test_labels).mean())
    assert acc >= 0.9


def test_action_head_is_trained_only_when_actions_are_given_and_shapes_f() -> None:
    imgs, labels = _images(96, 0)
    # one facial action: the brightness of the lower-left corner (independent of the class)
    actions = (np.arange(96) % 3 == 0).astype(np.float32)[:, None]
    imgs[actions[:, 0] == 1, 24:, :8, :] = 250
    cfg = SourceTrainConfig(epochs=4, batch_size=32, lr=5e-3, seed=7)
    f_plain, _, h_plain = train_source(imgs, labels, CFG, cfg)
    f_aux, _, h_aux = train_source(imgs, labels, CFG, cfg, actions=actions)
    assert h_plain["actions_loss"] == [0.0] * 4
    assert h_aux["actions_loss"][-1] < h_aux["actions_loss"][0]  # the head learns the action
    assert not torch.equal(f_plain.conv1.weight, f_aux.conv1.weight)  # and it changes F
    off = cfg.model_copy(update={"lambda_actions": 0.0})
    f_off, _, h_off = train_source(imgs, labels, CFG, off, actions=actions)
    assert torch.equal(f_off.conv1.weight, f_plain.conv1.weight) and h_off["actions_loss"] == [0.0] * 4
    with pytest.raises(ValueError, match="actions"):
        train_source(imgs, labels, CFG, cfg, actions=actions[:10])


def test_train_source_rejects_bad_labels() -> None:
    imgs, _ = _images(8, 0)
    with pytest.raises(ValueError):
        train_source(imgs, np.full(8, 2), CFG, SourceTrainConfig(epochs=1))
    with pytest.raises(ValueError, match="epochs is None"):  # an experiment's unresolved default
        train_source(imgs, np.zeros(8), CFG, SourceTrainConfig(epochs=None))


def test_source_styles_round_trip_and_normalised_codes() -> None:
    subjects = synthetic_subjects(5, CFG)
    norm, styles = source_styles(subjects)
    codes = torch.stack([styles.codes[n] for n in sorted(subjects)])
    torch.testing.assert_close(codes.mean(0), torch.zeros(CFG.style_dim), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm(subjects["s01"].neutral_style()), styles.codes["s01"])
    back = SourceStyles.from_tensors(styles.as_tensors())
    assert back.codes.keys() == styles.codes.keys()
    assert all(torch.equal(back.neutral_std[k], styles.neutral_std[k]) for k in styles.codes)


def test_pretrain_translator_trains_t_only_and_is_deterministic() -> None:
    subjects = synthetic_subjects(6, CFG)
    c = _frozen_classifier(CFG)
    before = {k: v.clone() for k, v in c.state_dict().items()}
    cfg = TranslatorPretrainConfig(
        iterations=40, batch_size=16, neutral_batch_size=8, pairs_per_step=2, seed=3
    )
    t1, norm, hist = pretrain_translator(subjects, c, CFG, cfg)
    t2, _, _ = pretrain_translator(subjects, c, CFG, cfg)
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())
    assert all(p.requires_grad for p in c.parameters())  # restored
    assert all(
        torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values(), strict=True)
    )
    assert float(t1.out.weight.detach().abs().sum()) > 0  # moved off the identity start
    assert np.mean(hist["style"][-10:]) < np.mean(hist["style"][:5])
    assert set(hist["pairs"]) == set(subjects) and all(k != v for k, v in hist["pairs"].items())
    assert norm.mean.shape == (CFG.style_dim,)


def test_pretrain_translator_landmark_needs_descriptors() -> None:
    subjects = synthetic_subjects(3, CFG)
    subjects["s00"].descriptor = None
    with pytest.raises(ValueError, match="descriptor"):
        pretrain_translator(subjects, _frozen_classifier(CFG), CFG, TranslatorPretrainConfig(iterations=1))
    t, _, _ = pretrain_translator(
        subjects, _frozen_classifier(CFG), CFG, TranslatorPretrainConfig(iterations=2, pairing="cosine")
    )
    assert t.param_count() > 0


def test_extract_features_is_eval_mode_and_batch_independent() -> None:
    fx = FeatureExtractor(CFG)
    imgs, _ = _images(6, 2)
    f_all, _ = extract_features(fx, imgs, batch_size=6)
    f_small, _ = extract_features(fx, imgs, batch_size=2)
    torch.testing.assert_close(f_all, f_small)
