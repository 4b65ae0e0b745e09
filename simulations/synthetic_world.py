"""Synthetic cached-feature subjects for the engine benchmarks and the batched engine's tests.

No videos: a source model (C, T0 with a non-zero output layer, an identity style normaliser, source
styles) and, per subject, neutral pooled features (N, D) and frame statistics drawn from a
per-subject distribution (a subject offset + frame noise, non-negative like F's pooled ReLU
outputs), split over a few videos with frame indices. Everything is a function of ``seed``, so
every engine gets the same features and the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pft.core.models import Classifier, ModelConfig, StyleNormalizer, Translator
from pft.core.personalize import SourceModel
from pft.core.training import SourceStyles


@dataclass
class SyntheticSubject:
    """One subject's cached neutral features, frame statistics, video ids and frame indices."""

    name: str
    features: Tensor
    frame_stats: Tensor
    video_ids: Tensor
    time_index: Tensor


def synthetic_model(seed: int = 0, config: ModelConfig | None = None, sources: int = 12) -> SourceModel:
    """A source model with seeded random C and T0 (T0's output layer non-zero, like a trained T)."""
    config = config or ModelConfig()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classifier, translator = Classifier(config).eval(), Translator(config).eval()
    with torch.no_grad():
        translator.out.weight.copy_(0.05 * torch.randn(translator.out.weight.shape, generator=gen))
        translator.out.bias.copy_(0.05 * torch.randn(translator.out.bias.shape, generator=gen))
    styles = SourceStyles()
    descriptors: dict[str, np.ndarray] = {}
    d = config.pooled_dim
    for m in range(sources):
        name = f"source_{m:03d}"
        mean = torch.rand(d, generator=gen) + 0.1
        styles.codes[name] = torch.randn(config.style_dim, generator=gen)
        styles.neutral_mean[name] = mean
        styles.neutral_std[name] = 0.2 + 0.1 * torch.rand(d, generator=gen)
        descriptors[name] = mean.double().numpy()
    return SourceModel(
        classifier, translator, StyleNormalizer(config.style_dim), styles, descriptors, "cosine"
    )


def synthetic_subject(
    index: int, seed: int = 0, config: ModelConfig | None = None, frames: int = 96, videos: int = 3
) -> SyntheticSubject:
    """Subject ``index`` of the synthetic cohort of ``seed`` (independent of how many are made)."""
    config = config or ModelConfig()
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index + 1)
    d, c = config.pooled_dim, config.stats_dim
    offset = torch.rand(d, generator=gen) + 0.1
    features = (offset + 0.2 * torch.randn(frames, d, generator=gen)).abs()
    stats = (torch.rand(c, generator=gen) + 0.2 * torch.randn(frames, c, generator=gen)).abs()
    video_ids = torch.arange(frames) % videos
    time_index = torch.arange(frames) // videos * 2
    return SyntheticSubject(f"subject_{index:06d}", features, stats, video_ids, time_index)
