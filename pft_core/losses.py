"""The losses of SFDA-PFT, as the paper's slides define them.

- ``style_loss`` (identity alignment):
  ``L_style = sum_l ||mu(f^_i^l) - mu(f_j^l)||_2^2 + ||sigma(f^_i^l) - sigma(f_j^l)||_2^2``
- ``expression_loss`` (expression preservation): ``L_expr = KL(C(f_i) || C(f^_i))``
- ``classification_loss`` (source classification): ``L_CE = -log C(F(x_s))[y_s]``
- ``consistency_loss`` (target stage): ``KL(stopgrad p_b || p_a)`` between two target images.

The stage-3 terms (``consistency_loss``, ``neutral_calibration_loss``, ``moment_distance`` over
``batch_statistics``, ``reference_mean_loss``) work on any leading dimensions - one person's batch
``(B, K)``, stacked subjects ``(M, B, K)`` - and take a ``reduction``: ``"none"`` keeps one value
per frame ``(..., B)``, ``"mean"`` averages over the batch axis ``(...)``. They are composed into
the stage-3 objective in :mod:`pft.core.objective`.

Every KL here is between probability distributions built with ``log_softmax`` (the authors' code
passed raw logits), and every term carries a gradient to the parameters it trains (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F_nn
from torch import Tensor

STATS_EPS = 1e-5
Reduction = Literal["none", "mean"]
"""``none``: one value per frame ``(..., B)``; ``mean``: the mean over the batch axis ``(...)``."""


def channel_stats(x: Tensor, eps: float = STATS_EPS) -> tuple[Tensor, Tensor]:
    """Channel-wise mean and std (AdaIN statistics).

    Parameters
    ----------
    x : (N, C, H, W) feature maps (statistics over N, H, W) or (N, C) pooled features (over N).
    eps : added to the (biased, population) variance before the square root.

    Returns
    -------
    (mu, sigma), each of shape (C,); ``sigma = sqrt(var + eps)``.
    """
    if x.ndim == 4:
        dims: tuple[int, ...] = (0, 2, 3)
    elif x.ndim == 2:
        dims = (0,)
    else:
        raise ValueError(f"channel_stats expects (N, C, H, W) or (N, C), got shape {tuple(x.shape)}")
    mu = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    return mu, torch.sqrt(var + eps)


def style_loss(translated: Sequence[Tensor], reference: Sequence[Tensor | tuple[Tensor, Tensor]]) -> Tensor:
    """Identity alignment loss summed over layers (paper: ``L_style``).

    Parameters
    ----------
    translated : per layer, the translated features f^_i^l ((N, C, H, W) or (N, C)).
    reference : per layer, the reference features f_j^l, or their precomputed ``(mu, sigma)``
        (the source style statistics a bundle ships).
    """
    if len(translated) != len(reference) or not translated:
        raise ValueError("style_loss needs the same, non-zero number of translated and reference layers")
    total = translated[0].new_zeros(())
    for t, r in zip(translated, reference, strict=True):
        mu_t, sigma_t = channel_stats(t)
        mu_r, sigma_r = r if isinstance(r, tuple) else channel_stats(r)
        total = total + (mu_t - mu_r).pow(2).sum() + (sigma_t - sigma_r).pow(2).sum()
    return total


def expression_loss(reference_logits: Tensor, translated_logits: Tensor) -> Tensor:
    """Expression preservation ``KL(C(f) || C(f^))`` (batch mean); the reference is detached."""
    log_p = F_nn.log_softmax(reference_logits.detach(), dim=1)
    log_q = F_nn.log_softmax(translated_logits, dim=1)
    return F_nn.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Source classification ``-log C(.)[y]`` (mean cross-entropy)."""
    return F_nn.cross_entropy(logits, labels.long())


def _reduce(per_frame: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return per_frame
    if reduction == "mean":
        return per_frame.mean(-1)
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def consistency_loss(logits_a: Tensor, logits_b: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Prediction consistency between two target images: ``KL(stopgrad p_b || p_a)``.

    Parameters
    ----------
    logits_a : (..., B, K) logits of the frames being trained (the gradient flows through them).
    logits_b : (..., B, K) logits of the partner frames (or the frozen path): the target
        distribution, detached.
    reduction : ``"none"`` gives ``sum_k p_b log(p_b / p_a)`` per frame (..., B); ``"mean"`` its
        mean over the batch axis (...,) - for (B, K) inputs the batch-mean KL.
    """
    log_p_a = F_nn.log_softmax(logits_a, dim=-1)
    log_p_b = F_nn.log_softmax(logits_b.detach(), dim=-1)
    return _reduce((log_p_b.exp() * (log_p_b - log_p_a)).sum(-1), reduction)


def neutral_calibration_loss(
    logits: Tensor, neutral_class: int, smoothing: float, reduction: Reduction = "mean"
) -> Tensor:
    """The known-neutral term: cross-entropy of frames known to be neutral against a smoothed target.

    With ``eps = smoothing`` and K classes the target puts ``1 - eps + eps / K`` on the neutral
    class and ``eps / K`` on every other, so the per-frame value is
    ``-(1 - eps) log p[neutral] - (eps / K) sum_k log p[k]`` (``F.cross_entropy``'s
    ``label_smoothing`` rule). Logits (..., B, K); ``reduction`` as :func:`consistency_loss`.
    """
    log_p = F_nn.log_softmax(logits, dim=-1)
    per_frame = -log_p[..., neutral_class]
    if smoothing > 0:
        k = log_p.shape[-1]
        per_frame = (1 - smoothing) * per_frame - (smoothing / k) * log_p.sum(-1)
    return _reduce(per_frame, reduction)


def batch_statistics(x: Tensor, eps: float = STATS_EPS) -> tuple[Tensor, Tensor]:
    """Mean and std of features (..., N, C) over their batch axis N: each (..., C).

    ``sigma = sqrt(var + eps)`` with the biased (population) variance computed as the mean squared
    deviation (two passes; torch's ``var`` over a middle axis is a scalar loop, several times
    slower). For (N, C) this is :func:`channel_stats` of pooled features up to float rounding.
    """
    if x.ndim < 2:
        raise ValueError(f"batch_statistics expects (..., N, C), got shape {tuple(x.shape)}")
    mu = x.mean(-2, keepdim=True)
    deviation = x - mu
    # squared in place when no gradient flows (a fresh multi-MB tensor per step costs page faults)
    square = deviation.square() if deviation.requires_grad else deviation.square_()
    return mu.squeeze(-2), torch.sqrt(square.mean(-2) + eps)


def moment_distance(mu: Tensor, sigma: Tensor, reference_mu: Tensor, reference_sigma: Tensor) -> Tensor:
    """``||mu - mu_ref||_2^2 + ||sigma - sigma_ref||_2^2`` over the last (channel) axis: (...,).

    One layer's term of ``L_style`` (paper: identity alignment), for statistics with any leading
    dimensions (the reference's broadcast against them).
    """
    return (mu - reference_mu).square().sum(-1) + (sigma - reference_sigma).square().sum(-1)


def reference_mean_loss(translated: Tensor, reference_mu: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Per frame ``||f^ - mu_ref||_2^2``: the part of ``L_style`` that decomposes over frames.

    ``translated`` (..., B, D), ``reference_mu`` (..., D). For a shift of the features (T's output
    bias) its batch mean has the gradient of the batch style term, since a shift moves the mean and
    not the spread. ``reduction`` as :func:`consistency_loss`.
    """
    return _reduce((translated - reference_mu.unsqueeze(-2)).square().sum(-1), reduction)


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the predicted distributions (a diagnostic)."""
    log_p = F_nn.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()
