"""The methods an experiment compares, each a small runner over ``pft_core``'s one trainer.

A runner takes the source model, one target person's data and the settings, adapts on what the
method is allowed to see (PFT: the person's NEUTRAL ``adapt`` frames; the oracle: the labelled
``oracle`` frames; source-only: nothing) and returns logits on the held-out ``eval`` frames.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import Tensor

from pft_core.adaptation import AdaptationData, AdaptationTrainer, AdaptConfig, ModelParts, Oracle
from pft_core.config import FrozenConfig
from pft_core.personalize import PersonalizeConfig, SourceModel, personalize
from simulations.workspace import FrameSet


class MethodSettings(FrozenConfig):
    """Per-method settings: PFT's stage 3 and the oracle's supervised fine-tuning."""

    pft: PersonalizeConfig = PersonalizeConfig()
    oracle: AdaptConfig = AdaptConfig(max_iterations=150, min_iterations=150, lr=1e-3)
    seed: int = Field(0, ge=0)


@dataclass
class TargetData:
    """One target person's frames by split; ``eval`` is never shown to a method before predicting."""

    subject: str
    adapt: FrameSet
    oracle: FrameSet | None
    eval: FrameSet


@dataclass
class MethodOutcome:
    """Logits on the eval frames, the adaptation's cost, and (for translators) translated features."""

    logits: Tensor
    iterations: int
    seconds: float
    translated: Tensor | None = None


Runner = Callable[[SourceModel, TargetData, MethodSettings, int], MethodOutcome]


@torch.no_grad()
def run_source_only(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """The source model as it ships: ``C(F(x))``, no adaptation."""
    model.classifier.eval()
    return MethodOutcome(model.classifier(target.eval.features), 0, 0.0)


def run_pft(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """SFDA-PFT stage 3 on the person's neutral ``adapt`` frames only, then ``C(T(F(x)))``."""
    neutral = target.adapt
    result = personalize(
        model,
        neutral.features,
        neutral.frame_stats,
        settings.pft.model_copy(update={"seed": seed}),
        descriptor=neutral.mean_descriptor(),
        video_ids=neutral.video_ids,
        time_index=neutral.time_index,
    )
    translated = result.translate(target.eval.features)
    with torch.no_grad():
        logits = model.classifier(translated)
    return MethodOutcome(logits, result.result.iterations, result.result.seconds, translated)


def run_oracle(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """Upper bound: supervised fine-tuning of a copy of C on the person's labelled ``oracle`` frames."""
    if target.oracle is None or len(target.oracle) == 0:
        raise ValueError(f"{target.subject}: the oracle needs labelled `oracle` videos")
    classifier = copy.deepcopy(model.classifier)
    parts = ModelParts(classifier=classifier)
    data = AdaptationData(
        features=target.oracle.features,
        labels=target.oracle.labels,
        video_ids=target.oracle.video_ids,
        time_index=target.oracle.time_index,
    )
    result = AdaptationTrainer(settings.oracle.model_copy(update={"seed": seed})).fit(Oracle(), parts, data)
    with torch.no_grad():
        logits = classifier(target.eval.features)
    return MethodOutcome(logits, result.iterations, result.seconds)


METHODS: dict[str, Runner] = {
    "source_only": run_source_only,
    "pft": run_pft,
    "oracle": run_oracle,
}
