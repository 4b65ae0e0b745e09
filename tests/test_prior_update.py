"""pft.core.prior: the update, its clipping and noise, its epsilon, and T0 + mean update."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from pft.core.adaptation import ModelParts
from pft.core.errors import InvalidPriorUpdateError
from pft.core.models import ModelConfig, Translator
from pft.core.personalize import PersonalizeConfig
from pft.core.prior import (
    PriorUpdateConfig,
    apply_prior,
    clip_update,
    privatize_update,
    trainable_names,
    translator_update,
    update_norm,
)


def _translator(seed: int) -> Translator:
    torch.manual_seed(seed)
    return Translator(ModelConfig(width=8, translator_hidden=16))


def test_update_is_the_difference_of_the_named_tensors_only() -> None:
    t0 = _translator(0)
    personal = _translator(0)
    with torch.no_grad():
        personal.out.bias.add_(torch.arange(len(personal.out.bias), dtype=torch.float32))
        personal.out.weight.add_(1.0)  # changed, but not named: not part of the update
    update = translator_update(t0, personal, ("out.bias",))
    assert list(update) == ["out.bias"]
    assert torch.equal(update["out.bias"], torch.arange(len(t0.out.bias), dtype=torch.float32))
    with pytest.raises(InvalidPriorUpdateError):
        translator_update(t0, personal, ("no.such",))


def test_trainable_names_of_bias_only_pft() -> None:
    t = _translator(1)
    c = torch.nn.Linear(1, 1)
    z = torch.zeros(1)
    parts = ModelParts(classifier=c, translator=t, style_target=z, style_reference=z)  # type: ignore[arg-type]
    method = PersonalizeConfig(bias_only=True).method()
    assert trainable_names(t, method.trainable_parameters(parts)) == ("out.bias",)


def test_clipping_by_hand() -> None:
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # norm 5
    assert update_norm(update) == pytest.approx(5.0)
    clipped = clip_update(update, 1.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert update_norm(clipped) == pytest.approx(1.0)
    unchanged = clip_update(update, 10.0)  # below the norm: untouched
    assert torch.equal(unchanged["a"], update["a"]) and torch.equal(unchanged["b"], update["b"])


def test_noise_std_is_sigma_times_clip_norm() -> None:
    n = 200_000
    update = {"w": torch.zeros(n)}
    config = PriorUpdateConfig(clip_norm=0.5, noise_multiplier=2.0)
    noised, release = privatize_update(update, config, torch.Generator().manual_seed(0))
    std = float(noised["w"].std())
    assert std == pytest.approx(1.0, rel=0.01)  # sigma * C = 2 * 0.5; 200k samples: ~0.2 % error
    assert abs(float(noised["w"].mean())) < 0.01
    # same seed, same noise; another seed, other noise
    again, _ = privatize_update(update, config, torch.Generator().manual_seed(0))
    other, _ = privatize_update(update, config, torch.Generator().manual_seed(1))
    assert torch.equal(again["w"], noised["w"]) and not torch.equal(other["w"], noised["w"])
    assert release.privacy_unit == "person" and release.sample_rate == 1.0 and release.steps == 1


def test_noised_update_is_clipped_before_noise() -> None:
    update = {"w": torch.full((50_000,), 10.0)}  # norm ~2236, clipped to 1
    config = PriorUpdateConfig(clip_norm=1.0, noise_multiplier=1.0)
    noised, _ = privatize_update(update, config, torch.Generator().manual_seed(3))
    expected_mean = 1.0 / math.sqrt(50_000)  # each coordinate after clipping
    assert float(noised["w"].mean()) == pytest.approx(expected_mean, abs=3 / math.sqrt(50_000))
    assert float(noised["w"].std()) == pytest.approx(1.0, rel=0.02)


def test_epsilon_is_opacus_accountant_for_one_full_batch_step() -> None:
    for sigma in (0.8, 1.5, 4.0):
        release = privatize_update(
            {"w": torch.zeros(3)}, PriorUpdateConfig(noise_multiplier=sigma), torch.Generator()
        )[1]
        acc = RDPAccountant()
        acc.history = [(sigma, 1.0, 1)]
        assert release.epsilon == pytest.approx(acc.get_epsilon(delta=1e-5))
    # more noise, less epsilon; a target epsilon is met
    target = PriorUpdateConfig(epsilon=4.0)
    release = privatize_update({"w": torch.zeros(3)}, target, torch.Generator())[1]
    assert release.epsilon <= 4.0 + 1e-6 and release.epsilon > 3.5


def test_no_noise_spends_infinite_epsilon() -> None:
    _, release = privatize_update(
        {"w": torch.ones(2)}, PriorUpdateConfig(noise_multiplier=0.0), torch.Generator()
    )
    assert math.isinf(release.epsilon)


def test_non_finite_updates_are_refused() -> None:
    with pytest.raises(InvalidPriorUpdateError):
        privatize_update(
            {"w": torch.tensor([1.0, math.nan])}, PriorUpdateConfig(noise_multiplier=1.0), torch.Generator()
        )
    with pytest.raises(InvalidPriorUpdateError):
        privatize_update({}, PriorUpdateConfig(noise_multiplier=1.0), torch.Generator())


def test_apply_prior_adds_the_mean_update_to_t0() -> None:
    t0 = _translator(2).state_dict()
    delta = {"out.bias": torch.full_like(t0["out.bias"], 0.25)}
    new = apply_prior(t0, delta)
    assert torch.allclose(new["out.bias"], t0["out.bias"] + 0.25)
    for k in t0:
        if k != "out.bias":
            assert torch.equal(new[k], t0[k])
    with pytest.raises(InvalidPriorUpdateError):
        apply_prior(t0, {"out.bias": torch.zeros(3)})  # wrong shape
    with pytest.raises(InvalidPriorUpdateError):
        apply_prior(t0, {"nope": torch.zeros(3)})
    with pytest.raises(InvalidPriorUpdateError):
        apply_prior(t0, {"out.bias": torch.full_like(t0["out.bias"], math.inf)})
