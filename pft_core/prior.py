"""The opt-in federated translator prior: what one device releases, and how the server applies it.

New users start stage 3 from the pre-trained translator T0. With consent, a device that has
personalised T sends the UPDATE of T's trainable tensors (``delta = T_personal - T0``), made
differentially private ON THE DEVICE before it leaves (local DP):

- the whole update (all its tensors, as one vector) is clipped to L2 norm ``C``;
- Gaussian noise ``N(0, (sigma C)^2)`` is added to every coordinate.

That is the Gaussian mechanism with L2 sensitivity ``C`` run once on the person's data: the
privacy unit is the PERSON (the update depends on all their neutral frames together), and it is
accounted by the project's accountant as one step at sample rate 1
(:func:`pft.core.privacy.epsilon_spent` with ``(sigma, 1.0, 1)``). The server then sees only the
SecAgg+ sum of such updates (``server/prior_app.py``); the local noise protects each person even
against a server that could see the sum, and the published prior is post-processing.

The server's new starting point is ``T0' = T0 + mean(update)`` (:func:`apply_prior`).
No Flower here: ``client/prior_app.py`` and ``server/prior_app.py`` call these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import Field
from torch import Tensor

from pft.core.config import FrozenConfig
from pft.core.errors import InvalidPriorUpdateError
from pft.core.models import Translator
from pft.core.privacy import AccountantName, DPRelease, epsilon_spent, noise_for_target

__all__ = [
    "PriorUpdateConfig",
    "apply_prior",
    "check_update",
    "clip_update",
    "privatize_update",
    "trainable_names",
    "translator_update",
    "update_norm",
    "update_release",
]


class PriorUpdateConfig(FrozenConfig):
    """How each device privatises its translator update.

    Give EITHER ``epsilon`` (the per-release target at ``delta``; ``sigma`` found with Opacus's
    accountant for one step at sample rate 1) OR ``noise_multiplier`` (``0`` = clipping only,
    epsilon infinite: only for measuring what the noise costs).
    """

    clip_norm: float = Field(0.5, gt=0, allow_inf_nan=False)
    epsilon: float | None = Field(None, gt=0, allow_inf_nan=False)
    noise_multiplier: float | None = Field(None, ge=0, allow_inf_nan=False)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: AccountantName = "rdp"

    def sigma(self) -> float:
        """The noise multiplier (given, or the one that spends ``epsilon`` in one release)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if self.epsilon is None:
            raise ValueError("PriorUpdateConfig needs `epsilon` or `noise_multiplier`")
        return noise_for_target(self.epsilon, self.delta, 1.0, 1, self.accountant)


def translator_update(t0: Translator, personal: Translator, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The update ``personal - t0`` of the named (trainable) tensors only.

    Parameters
    ----------
    t0, personal:
        The starting translator and the person's adapted copy (same architecture).
    names:
        State-dict names of the tensors stage 3 trains (e.g. ``("out.bias",)`` for bias-only PFT).
    """
    a, b = t0.state_dict(), personal.state_dict()
    missing = [n for n in names if n not in a or n not in b]
    if missing or not names:
        raise InvalidPriorUpdateError(f"translator has no tensor(s) {missing or list(names)}")
    return {n: (b[n].detach().double() - a[n].detach().double()).float() for n in names}


def trainable_names(translator: Translator, parameters: list[torch.nn.Parameter]) -> tuple[str, ...]:
    """The state-dict names of ``parameters`` (as a method's ``trainable_parameters`` returns them)."""
    ids = {id(p) for p in parameters}
    return tuple(n for n, p in translator.named_parameters() if id(p) in ids)


def update_norm(update: Mapping[str, Tensor]) -> float:
    """The L2 norm of the whole update, all tensors as one vector."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: Mapping[str, Tensor], clip_norm: float) -> dict[str, Tensor]:
    """``update * min(1, C / ||update||)``: the whole update scaled to L2 norm at most ``C``."""
    norm = update_norm(update)
    scale = 1.0 if norm <= clip_norm else clip_norm / norm
    return {k: (v.double() * scale).float() for k, v in update.items()}


def update_release(config: PriorUpdateConfig) -> DPRelease:
    """The DP release one privatised update is: Gaussian mechanism, sensitivity ``C``, the person
    as the unit, one step at sample rate 1 (epsilon from the accountant)."""
    sigma = config.sigma()
    eps = epsilon_spent([(sigma, 1.0, 1)], config.delta, config.accountant)
    return DPRelease(
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        delta=config.delta,
        max_grad_norm=config.clip_norm,
        accountant=config.accountant,
        privacy_unit="person",
        records=1,
        epsilon=eps,
    )


def privatize_update(
    update: Mapping[str, Tensor], config: PriorUpdateConfig, generator: torch.Generator
) -> tuple[dict[str, Tensor], DPRelease]:
    """Clip the whole update to ``C`` and add ``N(0, (sigma C)^2)`` to every coordinate.

    Parameters
    ----------
    update:
        :func:`translator_update`'s tensors.
    config:
        Clipping norm and noise (or target epsilon).
    generator:
        The device's seeded generator for the noise.

    Returns
    -------
    (dict, DPRelease)
        The noised update and the release it is (to check and record in the ledger BEFORE sending).
    """
    check_update(update)
    release = update_release(config)
    clipped = clip_update(update, config.clip_norm)
    std = release.noise_multiplier * config.clip_norm
    noised = {
        k: (v.double() + std * torch.randn(v.shape, generator=generator, dtype=torch.float64)).float()
        for k, v in clipped.items()
    }
    return noised, release


def check_update(update: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Refuse an update that is empty, not finite, or (given ``shapes``) of other names or shapes.

    Raises
    ------
    InvalidPriorUpdateError
        What is wrong with it.
    """
    if not update:
        raise InvalidPriorUpdateError("the update holds no tensors")
    for name, tensor in update.items():
        if not torch.isfinite(tensor).all():
            raise InvalidPriorUpdateError(f"update tensor {name!r} holds NaN or Inf")
    if shapes is not None:
        if set(update) != set(shapes):
            raise InvalidPriorUpdateError(f"update names {sorted(update)} != expected {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(update[name].shape) != tuple(shape):
                raise InvalidPriorUpdateError(
                    f"update tensor {name!r} has shape {tuple(update[name].shape)}, expected {tuple(shape)}"
                )


def apply_prior(t0_state: Mapping[str, Tensor], mean_update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``T0 + mean update`` on the updated tensors; every other tensor of T0 unchanged.

    Raises
    ------
    InvalidPriorUpdateError
        The update is not finite or does not match T0's tensors.
    """
    unknown = sorted(set(mean_update) - set(t0_state))
    if unknown:
        raise InvalidPriorUpdateError(f"T0 has no tensor(s) {unknown}")
    check_update(mean_update, {k: tuple(t0_state[k].shape) for k in mean_update})
    out = {k: v.detach().clone() for k, v in t0_state.items()}
    for k, v in mean_update.items():
        out[k] = (out[k].double() + v.double()).to(out[k].dtype)
    return out
