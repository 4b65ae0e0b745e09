"""Personalising the translator for one person: the one implementation the SDK, the Flower client
and the simulations all call.

Given the source model (C, T0, the style normaliser, the source subjects' styles and pairing
descriptors - what a bundle ships) and the person's NEUTRAL frames (features from F), it computes
the person's style code, picks the reference source subject by the pairing strategy, and adapts a
copy of T with :class:`~pft.core.adaptation.PFTAdaptation` on the shared trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from pft.core.adaptation import AdaptConfig, AdaptResult, ModelParts, PFTAdaptation, adapt_translator
from pft.core.config import FrozenConfig
from pft.core.errors import TooFewFacesError
from pft.core.models import Classifier, StyleNormalizer, Translator, style_code
from pft.core.objective import PFTObjective, ReferenceTargets
from pft.core.pairing import Strategy, match_references
from pft.core.privacy import DPConfig, DPRelease, adapt_translator_private
from pft.core.training import SourceStyles


class PersonalizeConfig(FrozenConfig):
    """Stage 3 as it ships: the objective, what of T adapts, the trainer's settings, the reference.

    The ONE place of the shipped stage-3 defaults (the SDK, the Flower client, the simulations and
    the batched engine all take this config; ``method()`` builds the trainer's method from it).
    Chosen on the validation cohort seeds 100-102 (biovid, stressid, bah; docs/results.md,
    "Validation"): the objective's defaults (:class:`pft.core.objective.PFTObjective`:
    consistency 0.5, known-neutral calibration 1 with smoothing 0.6, style term off); only T's
    output bias adapts (``bias_only``; adapting T's last layer or all of T, anchored by the
    frozen-path consistency, lost 10-20 points on validation), for at
    most 60 Adam steps at lr 0.01; T translates towards the mean style code of the
    ``reference_k`` = 5 source subjects closest by the pairing strategy. ``min_frames`` is the
    fewest usable neutral face frames adaptation accepts (docs/reliability.md: refuse rather than
    learn from noise, case 13).
    """

    adapt: AdaptConfig = AdaptConfig(lr=0.01)
    objective: PFTObjective = PFTObjective()
    last_layers: int | None = Field(None, ge=1)
    bias_only: bool = True
    reference_k: int = Field(5, ge=1)
    min_frames: int = Field(8, ge=1)
    seed: int = 0
    dp: DPConfig | None = None  # DP-SGD on T (pft.core.privacy); None = no DP

    def method(self) -> PFTAdaptation:
        """The stage-3 method with these settings."""
        return PFTAdaptation(self.objective, bias_only=self.bias_only, last_layers=self.last_layers)


@dataclass
class SourceModel:
    """What a device (or a simulated one) holds before personalisation."""

    classifier: Classifier
    translator: Translator
    normalizer: StyleNormalizer
    styles: SourceStyles
    descriptors: Mapping[str, np.ndarray]
    pairing: Strategy


@dataclass
class Personalization:
    """A person's adapted translator and the codes it is used with: ``C(T(f, s_target, s_ref))``."""

    translator: Translator
    style_target: Tensor
    style_reference: Tensor
    reference_subject: str
    result: AdaptResult
    privacy: DPRelease | None = None  # the DP release when ``config.dp`` was set

    @torch.no_grad()
    def translate(self, features: Tensor) -> Tensor:
        """Translated features ``T(f, s_target, s_reference)``."""
        self.translator.eval()
        return self.translator(features, self.style_target, self.style_reference)

    @torch.no_grad()
    def logits(self, classifier: Classifier, features: Tensor) -> Tensor:
        """``C(T(f))`` for features (N, D)."""
        classifier.eval()
        return classifier(self.translate(features))


def pairing_query(strategy: Strategy, features: Tensor, descriptor: np.ndarray | None) -> np.ndarray:
    """The vector a target is matched with: mean neutral feature (cosine, random) or landmarks."""
    if strategy == "landmark":
        if descriptor is None:
            raise ValueError("landmark pairing needs the person's landmark descriptor")
        return np.asarray(descriptor, dtype=np.float64)
    return features.double().mean(0).numpy()


@dataclass
class TranslationGoal:
    """Where a person's features are translated from and to (computed before adaptation)."""

    style_target: Tensor
    style_reference: Tensor
    targets: ReferenceTargets
    references: list[str]


def translation_goal(
    model: SourceModel,
    features: Tensor,
    frame_stats: Tensor,
    config: PersonalizeConfig,
    descriptor: np.ndarray | None = None,
) -> TranslationGoal:
    """The person's style code, the ``reference_k`` source subjects matched by the pairing
    strategy (closest first), and their mean style code and neutral statistics.

    Raises
    ------
    TooFewFacesError
        Fewer than ``config.min_frames`` frames.
    """
    if len(features) < config.min_frames:
        raise TooFewFacesError(len(features), config.min_frames)
    s_target = style_code(features, frame_stats, model.normalizer).detach()
    query = pairing_query(model.pairing, features, descriptor)
    candidates = {k: v for k, v in model.descriptors.items() if k in model.styles.codes}
    references = match_references(query, candidates, model.pairing, config.reference_k, config.seed)
    styles = model.styles
    return TranslationGoal(
        s_target,
        torch.stack([styles.codes[r] for r in references]).mean(0),
        ReferenceTargets(
            mean=torch.stack([styles.neutral_mean[r] for r in references]).mean(0),
            std=torch.stack([styles.neutral_std[r] for r in references]).mean(0),
        ),
        references,
    )


def personalize(
    model: SourceModel,
    features: Tensor,
    frame_stats: Tensor,
    config: PersonalizeConfig,
    *,
    descriptor: np.ndarray | None = None,
    video_ids: Tensor | None = None,
    time_index: Tensor | None = None,
) -> Personalization:
    """Adapt a copy of T to one person from their NEUTRAL frames only (F and C untouched).

    Parameters
    ----------
    model:
        The source model parts.
    features, frame_stats:
        F's pooled features (N, D) and frame statistics (N, 2C) of the person's neutral frames.
    config:
        Stage-3 settings.
    descriptor:
        The person's mean landmark geometry descriptor (needed for ``landmark`` pairing).
    video_ids, time_index:
        Which video and frame each row comes from (two frames of one video are paired).

    Raises
    ------
    TooFewFacesError
        Fewer than ``config.min_frames`` frames.
    """
    goal = translation_goal(model, features, frame_stats, config, descriptor)
    parts = ModelParts(
        classifier=model.classifier,
        translator=model.translator,
        style_target=goal.style_target,
        style_reference=goal.style_reference,
        targets=goal.targets,
    )
    adapt_config = config.adapt.model_copy(update={"seed": config.seed})
    if config.dp is not None:  # DP-SGD (Opacus) on the same trainer; see pft.core.privacy
        translator, result, release = adapt_translator_private(
            parts, features, adapt_config, config.method(), config.dp, video_ids, time_index
        )
        return Personalization(
            translator, goal.style_target, goal.style_reference, goal.references[0], result, release
        )
    translator, result = adapt_translator(
        parts, features, adapt_config, config.method(), video_ids=video_ids, time_index=time_index
    )
    return Personalization(translator, goal.style_target, goal.style_reference, goal.references[0], result)
