"""The paper's comparison baselines as small methods over the ONE adaptation trainer.

Each trained baseline is an :class:`~pft.core.adaptation.AdaptationMethod` (``name``,
``trainable_parameters``, ``loss``, ``predict``); the shared ``AdaptationTrainer`` owns batching,
the optimiser, seeding, device, the DP seam, logging and convergence. On cached features the
"feature extractor" the model-based SFDA methods adapt is the translator T (the feature-space module
in front of C); C is frozen, as in the originals, and F is frozen (its outputs are cached).

- ``SHOT`` (Liang et al., ICML 2020, "Do we really need to access the source data?"): information
  maximisation (entropy + diversity) and self-supervised nearest-centroid pseudo-labels.
- ``NRC`` (Yang et al., NeurIPS 2021, "Exploiting the intrinsic neighborhood structure for
  source-free domain adaptation"): neighbourhood reciprocity clustering over a memory bank.
- ``TPDS`` (Tang et al., IJCV 2024, "Source-free domain adaptation via target prediction
  distribution searching"): a searched, confident neighbour's prediction as the target of an
  invariant-information (IIC) consistency, plus diversity.
- ``NeutralNorm`` (no training): the person's neutral feature statistics swapped for the source's.
- ``NeutralCalibration`` (no training): C's neutral logit shifted per person so the person's neutral
  frames get the neutral confidence C gives source subjects' neutral frames.
- ``reestimate_batchnorm`` (AdaBN, Li et al. 2016): F's BatchNorm statistics re-estimated on the
  person's neutral face crops (not a trainer method: no loss, no gradient).

The target data is the person's NEUTRAL frames only (the paper's setting); see docs/baselines.md.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import Field
from torch import Tensor, nn

from pft.core.adaptation import AdaptConfig, Batch, ModelParts
from pft.core.config import FrozenConfig
from pft.core.losses import channel_stats, classification_loss
from pft.core.models import FeatureExtractor, Translator, preprocess

# --- shared loss pieces ---------------------------------------------------------------------------
EPSILON = 1e-5
"""The epsilon of SHOT/NRC/TPDS's entropy terms (``log(p + eps)``)."""


def information_maximisation(logits: Tensor, eps: float = EPSILON) -> tuple[Tensor, Tensor]:
    """SHOT's information-maximisation terms (Liang et al. 2020, eq. 2-3).

    Returns
    -------
    (L_ent, L_div): ``L_ent = mean_i -sum_k p_ik log(p_ik + eps)`` (minimised: confident
    predictions) and ``L_div = sum_k pbar_k log(pbar_k + eps)`` with ``pbar`` the batch-mean
    prediction (minimised: the batch-mean prediction's entropy is MAXIMISED, i.e. diverse
    predictions). ``L_IM = L_ent + L_div``.
    """
    p = F_nn.softmax(logits, dim=1)
    ent = -(p * torch.log(p + eps)).sum(1).mean()
    p_mean = p.mean(0)
    div = (p_mean * torch.log(p_mean + eps)).sum()
    return ent, div


def shot_pseudo_labels(features: Tensor, probs: Tensor, threshold: int = 0) -> Tensor:
    """SHOT's self-supervised pseudo-labels (Liang et al. 2020, eq. 4-6).

    Features get a constant 1 appended and are L2-normalised (cosine distance); class centroids are
    the prediction-weighted means ``c_k = sum_i p_ik f_i / sum_i p_ik``; each frame takes its
    nearest centroid (cosine distance); centroids are recomputed once from those hard labels and
    frames relabelled. Only classes predicted (argmax) for more than ``threshold`` frames are
    candidates.

    Parameters
    ----------
    features : (N, D) features fed to C (here T's outputs).
    probs : (N, K) softmax predictions.
    """
    f = torch.cat([features, features.new_ones(len(features), 1)], dim=1)
    f = F_nn.normalize(f, dim=1)
    k = probs.shape[1]
    counts = torch.bincount(probs.argmax(1), minlength=k)
    labelset = torch.nonzero(counts > threshold).flatten()
    if len(labelset) == 0:
        labelset = torch.arange(k)
    aff = probs
    labels = probs.argmax(1)
    for _ in range(2):  # initial (soft) centroids, then one round with hard labels
        centroids = aff.T @ f / (1e-8 + aff.sum(0)[:, None])
        dist = 1 - f @ F_nn.normalize(centroids[labelset], dim=1).T
        labels = labelset[dist.argmin(1)]
        aff = F_nn.one_hot(labels, k).to(f.dtype)
    return labels


def nrc_neighbours(
    bank: Tensor, query: Tensor, query_index: Tensor, k: int, kk: int, r: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NRC's neighbourhood and reciprocity weights (Yang et al. 2021, sec. 3.2-3.3).

    Parameters
    ----------
    bank : (N, D) L2-normalised memory bank of features (the query rows already written into it).
    query : (B, D) L2-normalised features of the batch.
    query_index : (B,) the rows of the batch in the bank (excluded from their own neighbours).
    k, kk : number of nearest neighbours and of expanded neighbours (neighbours of neighbours).
    r : affinity of a non-reciprocal neighbour and of every expanded neighbour.

    Returns
    -------
    (near (B, K), weight (B, K), near_near (B, K*KK), weight_near_near (B, K*KK)): neighbour j of
    query i is reciprocal (weight 1) when i is among j's ``kk`` nearest neighbours (as the authors'
    code), else weight ``r``; expanded neighbours all weigh ``r``.
    """
    sim = query @ bank.T
    sim[torch.arange(len(query)), query_index] = -math.inf
    near = sim.topk(k, dim=1).indices  # (B, K)
    sim_nn = bank[near] @ bank.T  # (B, K, N)
    sim_nn.scatter_(2, near.unsqueeze(-1), -math.inf)  # a neighbour is not its own neighbour
    near_near = sim_nn.topk(kk, dim=2).indices  # (B, K, KK)
    reciprocal = (near_near == query_index.view(-1, 1, 1)).any(-1)
    weight = torch.where(reciprocal, torch.ones_like(sim[:, :k]), torch.full_like(sim[:, :k], r))
    near_near = near_near.reshape(len(query), -1)
    return near, weight, near_near, torch.full(near_near.shape, r, dtype=bank.dtype)


def nrc_loss(
    probs: Tensor, scores: Tensor, near: Tensor, weight: Tensor, near_near: Tensor, weight_nn: Tensor
) -> tuple[Tensor, Tensor]:
    """NRC's neighbour and expanded-neighbour terms (Yang et al. 2021, eq. 3 and 5).

    ``L_N = -mean_i sum_j A_ij S_j . p_i`` over the K neighbours and
    ``L_E = -mean_i sum_m r S_m . p_i`` over the expanded neighbours, where S is the (detached)
    score bank and p_i the batch's predictions. Returns ``(L_N, L_E)``.
    """
    dot_n = torch.einsum("bkc,bc->bk", scores[near], probs)
    dot_e = torch.einsum("bmc,bc->bm", scores[near_near], probs)
    return -(weight * dot_n).sum(1).mean(), -(weight_nn * dot_e).sum(1).mean()


def iic_loss(p: Tensor, q: Tensor, eps: float = sys.float_info.epsilon) -> Tensor:
    """The invariant information clustering loss TPDS uses (Ji et al. 2019): ``-I(z, z')``.

    The joint ``P = sym(sum_b p_b q_b^T)`` normalised to sum 1, marginals ``P_i, P_j``;
    ``L = -sum_ij P_ij (log P_ij - log P_i - log P_j)`` (entries below ``eps`` clamped to ``eps``
    inside the log-joint, as the authors' code).
    """
    joint = (p.unsqueeze(2) * q.unsqueeze(1)).sum(0)
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    p_i = joint.sum(1, keepdim=True).expand_as(joint)
    p_j = joint.sum(0, keepdim=True).expand_as(joint)
    safe = joint.clamp_min(eps)
    return -(safe * (torch.log(safe) - torch.log(p_j) - torch.log(p_i))).sum()


def tpds_confidence(
    probs: Tensor, centroid_distance: Tensor, entropy_fraction: float = 0.5, distance_fraction: float = 0.6
) -> Tensor:
    """TPDS's pseudo-label constraint: which frames are confident (bool (N,)).

    A frame is unconfident when it is among the ``entropy_fraction`` highest-entropy predictions
    AND not among the ``distance_fraction`` frames closest to their SHOT centroid; every other
    frame is confident (the authors' ``obtain_label_ts``).
    """
    n = len(probs)
    ent = -(probs * torch.log(probs + EPSILON)).sum(1)
    high_entropy = torch.zeros(n, dtype=torch.bool)
    high_entropy[ent.topk(int(n * entropy_fraction)).indices] = True
    near_centroid = torch.zeros(n, dtype=torch.bool)
    near_centroid[centroid_distance.topk(int(n * distance_fraction), largest=False).indices] = True
    return ~(high_entropy & ~near_centroid)


def tpds_search(bank: Tensor, confident: Tensor, max_steps: int = 70) -> Tensor:
    """TPDS's prediction-distribution search: for every frame, the first confident frame on a
    greedy nearest-neighbour walk through the target bank (cosine similarity, no frame visited
    twice, the start excluded). A walk that finds none in ``max_steps`` falls back to the first
    step's neighbour (as the authors' ``obtain_nearest_trace``). Returns indices (N,).
    """
    n = len(bank)
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    unit = F_nn.normalize(bank, dim=1)
    sim = unit @ unit.T
    rows = torch.arange(n)
    visited = torch.zeros(n, n, dtype=torch.bool)
    visited[rows, rows] = True
    current = rows.clone()
    found = torch.full((n,), -1, dtype=torch.long)
    first = torch.empty(n, dtype=torch.long)
    for step in range(min(max_steps, n - 1)):
        masked = sim[current].masked_fill(visited, -math.inf)
        nxt = masked.argmax(1)
        if step == 0:
            first = nxt.clone()
        visited[rows, nxt] = True
        hit = (found < 0) & confident[nxt]
        found[hit] = nxt[hit]
        current = nxt
        if bool((found >= 0).all()):
            break
    return torch.where(found >= 0, found, first)


# --- the trained baselines -------------------------------------------------------------------------
def _translated(parts: ModelParts, features: Tensor) -> Tensor:
    translator, s_t, s_r = parts.require_translation()
    return translator(features, s_t, s_r)


def _translator_parameters(parts: ModelParts) -> list[nn.Parameter]:
    translator, _, _ = parts.require_translation()
    return list(translator.parameters())


@torch.no_grad()
def _bank_outputs(parts: ModelParts, bank: Tensor) -> tuple[Tensor, Tensor]:
    """T(f) and softmax(C(T(f))) of the whole target bank, with T briefly in eval mode."""
    translator, _, _ = parts.require_translation()
    was_training = translator.training
    translator.eval()
    try:
        h = _translated(parts, bank.to(next(translator.parameters()).device))
        return h, F_nn.softmax(parts.classifier(h), dim=1)
    finally:
        translator.train(was_training)


def _refresh_due(step: int, bank_size: int, batch_size: int, refresh_every: int | None) -> bool:
    every = refresh_every or max(1, math.ceil(bank_size / batch_size))  # default: once per epoch
    return step % every == 0


@dataclass
class SHOT:
    """SHOT: ``L = L_ent + lambda_div * L_div + lambda_pseudo * CE(C(T(f)), y_pseudo)``.

    ``bank`` holds the person's target (neutral) features; pseudo-labels are recomputed over it
    every ``refresh_every`` steps (default: once per epoch, as SHOT). C frozen, T adapted.
    Defaults from the paper: ``lambda_pseudo = 0.3``, ``lambda_div = 1``.
    """

    bank: Tensor
    lambda_pseudo: float = 0.3
    lambda_div: float = 1.0
    refresh_every: int | None = None
    name: str = "shot"
    _step: int = field(default=0, init=False, repr=False)
    _pseudo: Tensor | None = field(default=None, init=False, repr=False)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of T's parameters."""
        return _translator_parameters(parts)

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """IM + pseudo-label cross-entropy on one batch."""
        if self._pseudo is None or _refresh_due(
            self._step, len(self.bank), len(batch.index), self.refresh_every
        ):
            h, probs = _bank_outputs(parts, self.bank)
            self._pseudo = shot_pseudo_labels(h.cpu(), probs.cpu())
        self._step += 1
        logits = parts.classifier(_translated(parts, batch.features))
        ent, div = information_maximisation(logits)
        total = ent + self.lambda_div * div
        terms = {"entropy": float(ent.detach()), "diversity": float(div.detach())}
        if self.lambda_pseudo > 0:
            ce = classification_loss(logits, self._pseudo[batch.index].to(logits.device))
            total = total + self.lambda_pseudo * ce
            terms["pseudo_ce"] = float(ce.detach())
        return total, terms

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))``."""
        return parts.classifier(_translated(parts, features))


@dataclass
class NRC:
    """NRC: ``L = L_N + L_E + lambda_div * L_div`` with a feature/score memory bank.

    The bank (L2-normalised T(f) and softmax scores of every target frame) is filled before the
    first step and the batch's rows are overwritten every step (as the authors' code). Defaults
    from the paper's small-dataset setting: K = 3, KK = 2, r = 0.1.
    """

    bank: Tensor
    k: int = 3
    kk: int = 2
    r: float = 0.1
    lambda_div: float = 1.0
    name: str = "nrc"
    _features: Tensor | None = field(default=None, init=False, repr=False)
    _scores: Tensor | None = field(default=None, init=False, repr=False)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of T's parameters."""
        return _translator_parameters(parts)

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Neighbour + expanded-neighbour + diversity terms on one batch."""
        if self._features is None or self._scores is None:
            h, probs = _bank_outputs(parts, self.bank)
            self._features, self._scores = F_nn.normalize(h, dim=1), probs
        h = _translated(parts, batch.features)
        logits = parts.classifier(h)
        probs = F_nn.softmax(logits, dim=1)
        index = batch.index.to(h.device)
        with torch.no_grad():
            unit = F_nn.normalize(h.detach(), dim=1)
            self._features[index] = unit
            self._scores[index] = probs.detach()
            k, kk = min(self.k, len(self.bank) - 1), min(self.kk, len(self.bank) - 1)
            near, weight, near_near, weight_nn = nrc_neighbours(
                self._features, unit, index, max(k, 1), max(kk, 1), self.r
            )
        l_n, l_e = nrc_loss(probs, self._scores, near, weight, near_near, weight_nn.to(h.device))
        _, div = information_maximisation(logits)
        total = l_n + l_e + self.lambda_div * div
        return total, {
            "neighbour": float(l_n.detach()),
            "expanded": float(l_e.detach()),
            "diversity": float(div.detach()),
        }

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))``."""
        return parts.classifier(_translated(parts, features))


@dataclass
class TPDS:
    """TPDS: ``L = IIC(p, p_searched) + lambda_div * L_div``.

    Every ``refresh_every`` steps (default once per epoch) the bank's predictions give SHOT
    centroids and TPDS's confident set; each frame's searched neighbour is the first confident
    frame on a nearest-neighbour walk over F's features (``tpds_search``); its prediction
    ``C(T(f_searched))`` (with gradient, as the authors' code) is the IIC partner of ``C(T(f))``.
    """

    bank: Tensor
    lambda_div: float = 1.0
    entropy_fraction: float = 0.5
    distance_fraction: float = 0.6
    max_steps: int = 70
    refresh_every: int | None = None
    name: str = "tpds"
    _step: int = field(default=0, init=False, repr=False)
    _searched: Tensor | None = field(default=None, init=False, repr=False)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of T's parameters."""
        return _translator_parameters(parts)

    def refresh(self, parts: ModelParts) -> None:
        """Recompute the confident set and every frame's searched neighbour."""
        h, probs = _bank_outputs(parts, self.bank)
        h, probs = h.cpu(), probs.cpu()
        labels = shot_pseudo_labels(h, probs)
        f = F_nn.normalize(torch.cat([h, h.new_ones(len(h), 1)], dim=1), dim=1)
        k = probs.shape[1]
        onehot = F_nn.one_hot(labels, k).to(f.dtype)
        centroids = F_nn.normalize(onehot.T @ f / (1e-8 + onehot.sum(0)[:, None]), dim=1)
        distance = 1 - (f * centroids[labels]).sum(1)
        confident = tpds_confidence(probs, distance, self.entropy_fraction, self.distance_fraction)
        self._searched = tpds_search(self.bank.cpu(), confident, self.max_steps)

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """IIC between each frame and its searched neighbour, plus diversity."""
        if self._searched is None or _refresh_due(
            self._step, len(self.bank), len(batch.index), self.refresh_every
        ):
            self.refresh(parts)
        assert self._searched is not None
        self._step += 1
        logits = parts.classifier(_translated(parts, batch.features))
        searched = self.bank[self._searched[batch.index]].to(logits.device)
        logits_s = parts.classifier(_translated(parts, searched))
        p, q = F_nn.softmax(logits, dim=1), F_nn.softmax(logits_s, dim=1)
        iic = iic_loss(p, q)
        _, div = information_maximisation(logits)
        total = iic + self.lambda_div * div
        return total, {"iic": float(iic.detach()), "diversity": float(div.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))``."""
        return parts.classifier(_translated(parts, features))


# --- training-free baselines -----------------------------------------------------------------------
def neutral_normalise(
    features: Tensor, person: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]
) -> Tensor:
    """``f' = (f - mu_person) / sigma_person * sigma_ref + mu_ref`` (per feature dimension)."""
    (mu_p, sigma_p), (mu_r, sigma_r) = person, reference
    return (features - mu_p) / sigma_p * sigma_r + mu_r


@dataclass(frozen=True)
class NeutralNorm:
    """The reviewers' baseline: ``C(f')`` with the person's neutral statistics swapped for a
    reference's (``neutral_normalise``); nothing is trained."""

    person: tuple[Tensor, Tensor]
    reference: tuple[Tensor, Tensor]
    name: str = "neutral_norm"

    @classmethod
    def from_neutral(cls, neutral_features: Tensor, reference: tuple[Tensor, Tensor]) -> NeutralNorm:
        """Person statistics from their neutral features: channel mean and ``sqrt(var + 1e-5)``."""
        return cls(channel_stats(neutral_features), reference)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """None."""
        return []

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """NeutralNorm trains nothing."""
        raise RuntimeError("NeutralNorm has no loss; it trains nothing")

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(f')``."""
        return parts.classifier(neutral_normalise(features, self.person, self.reference))


def calibration_shift(
    logits: Tensor, target: float, neutral_class: int = 0, tol: float = 1e-6, max_steps: int = 100
) -> float:
    """The shift ``delta`` of the neutral logit for which ``mean_i softmax(z_i + delta e_n)[n]``
    equals ``target`` (bisection; that mean rises monotonically with ``delta``).

    Parameters
    ----------
    logits : (N, K) logits of the person's neutral frames.
    target : the mean neutral probability to reach, in (0, 1).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"the calibration target must lie in (0, 1), got {target}")
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError("calibration needs the (N, K) logits of at least one neutral frame")
    z = logits.double()
    onehot = torch.zeros(z.shape[1], dtype=z.dtype)
    onehot[neutral_class] = 1.0

    def mean_p(delta: float) -> float:
        return float(torch.softmax(z + delta * onehot, dim=1)[:, neutral_class].mean())

    lo, hi = -1.0, 1.0
    while mean_p(lo) > target:
        lo *= 2.0
    while mean_p(hi) < target:
        hi *= 2.0
    for _ in range(max_steps):
        mid = 0.5 * (lo + hi)
        if mean_p(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class NeutralCalibration:
    """The simplest use of a neutral-only video: no translator; C's neutral bias shifted per person
    (``delta``) so that the person's neutral frames get, on average, the neutral probability that
    C gives source subjects' neutral frames. For two classes this is the decision threshold fitted
    on the person's neutral frames - what a bias-only stage 3 can at most express."""

    delta: float
    neutral_class: int = 0
    name: str = "neutral_calibration"

    @classmethod
    def fit(
        cls, classifier: nn.Module, neutral_features: Tensor, target: float, neutral_class: int = 0
    ) -> NeutralCalibration:
        """The shift for this person's neutral features (C in eval mode)."""
        with torch.no_grad():
            classifier.eval()
            logits = classifier(neutral_features)
        return cls(calibration_shift(logits, target, neutral_class), neutral_class)

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """None."""
        return []

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """NeutralCalibration trains nothing."""
        raise RuntimeError("NeutralCalibration has no loss; it trains nothing")

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(f) + delta e_neutral``."""
        logits = parts.classifier(features)
        shift = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
        shift[self.neutral_class] = self.delta
        return logits + shift


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def reestimate_batchnorm(
    extractor: FeatureExtractor, crops: np.ndarray, batch_size: int = 256
) -> FeatureExtractor:
    """AdaBN (Li et al. 2016): a COPY of F whose BatchNorm running statistics are re-estimated on
    ``crops`` (uint8 (N, H, W, 3)); every weight is unchanged and ``extractor`` is left untouched.

    Statistics are the cumulative average over batches of ``batch_size`` (exact batch statistics
    when the crops fit in one batch; PyTorch's unbiased running variance).
    """
    if len(crops) < 2:
        raise ValueError("AdaBN needs at least 2 face crops to estimate BatchNorm statistics")
    adapted = copy.deepcopy(extractor)
    norms = [m for m in adapted.modules() if isinstance(m, _BATCH_NORMS)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches
    adapted.train()
    x = preprocess(crops, adapted.config.image_size)
    for k in range(0, len(x), batch_size):
        chunk = x[k : k + batch_size]
        if len(chunk) > 1:  # BatchNorm cannot take a batch of one in train mode
            adapted(chunk)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    adapted.eval()
    return adapted


# --- configs -----------------------------------------------------------------------------------------
TranslatorInit = Literal["identity", "pretrained"]


def baseline_translator(pretrained: Translator, init: TranslatorInit) -> Translator:
    """The T a baseline adapts: a copy of the stage-2 T0 (``pretrained``) or that copy with its
    output layer zeroed (``identity``: ``C(T(f)) == C(f)`` at the start, i.e. the source model)."""
    translator = copy.deepcopy(pretrained)
    if init == "identity":
        with torch.no_grad():
            translator.out.weight.zero_()
            translator.out.bias.zero_()
    return translator


BASELINE_ADAPT = AdaptConfig(max_iterations=300, min_iterations=50, batch_size=64, lr=1e-3)
"""Trainer settings of SHOT/NRC/TPDS: batch 64 as the papers, Adam 1e-3 as PFT (see docs)."""


class SHOTConfig(FrozenConfig):
    """SHOT's settings (paper defaults: pseudo-label weight 0.3, diversity 1, refresh per epoch)."""

    adapt: AdaptConfig = BASELINE_ADAPT
    lambda_pseudo: float = Field(0.3, ge=0)
    lambda_div: float = Field(1.0, ge=0)
    refresh_every: int | None = Field(None, ge=1)
    init: TranslatorInit = "identity"

    def method(self, bank: Tensor) -> SHOT:
        """The method over the person's target features ``bank``."""
        return SHOT(bank, self.lambda_pseudo, self.lambda_div, self.refresh_every)


class NRCConfig(FrozenConfig):
    """NRC's settings (paper defaults for small datasets: K=3, KK=2, r=0.1)."""

    adapt: AdaptConfig = BASELINE_ADAPT
    k: int = Field(3, ge=1)
    kk: int = Field(2, ge=1)
    r: float = Field(0.1, ge=0)
    lambda_div: float = Field(1.0, ge=0)
    init: TranslatorInit = "identity"

    def method(self, bank: Tensor) -> NRC:
        """The method over the person's target features ``bank``."""
        return NRC(bank, self.k, self.kk, self.r, self.lambda_div)


class TPDSConfig(FrozenConfig):
    """TPDS's settings (authors' code: diversity 1 (Office), 50% entropy / 60% distance, 70 steps)."""

    adapt: AdaptConfig = BASELINE_ADAPT
    lambda_div: float = Field(1.0, ge=0)
    entropy_fraction: float = Field(0.5, ge=0, le=1)
    distance_fraction: float = Field(0.6, ge=0, le=1)
    max_steps: int = Field(70, ge=1)
    refresh_every: int | None = Field(None, ge=1)
    init: TranslatorInit = "identity"

    def method(self, bank: Tensor) -> TPDS:
        """The method over the person's target features ``bank``."""
        return TPDS(
            bank,
            self.lambda_div,
            self.entropy_fraction,
            self.distance_fraction,
            self.max_steps,
            self.refresh_every,
        )
