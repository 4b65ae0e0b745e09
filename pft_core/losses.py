"""The losses of SFDA-PFT, as the paper's slides define them.

- ``style_loss`` (identity alignment):
  ``L_style = sum_l ||mu(f^_i^l) - mu(f_j^l)||_2^2 + ||sigma(f^_i^l) - sigma(f_j^l)||_2^2``
- ``expression_loss`` (expression preservation): ``L_expr = KL(C(f_i) || C(f^_i))``
- ``classification_loss`` (source classification): ``L_CE = -log C(F(x_s))[y_s]``
- ``consistency_loss`` (target stage): ``KL(stopgrad p_b || p_a)`` between two target images.

Every KL here is between probability distributions built with ``log_softmax`` (the authors' code
passed raw logits), and every term carries a gradient to the parameters it trains (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F_nn
from torch import Tensor

STATS_EPS = 1e-5


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


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Prediction consistency between two target images: ``KL(stopgrad p_b || p_a)`` (batch mean).

    ``p_b`` (the second image, or the frozen path) is the target distribution and carries no
    gradient; the gradient flows through ``logits_a`` only.
    """
    return expression_loss(logits_b, logits_a)


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the predicted distributions (a diagnostic)."""
    log_p = F_nn.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()
