"""The methods an experiment compares, each a small runner over ``pft.core``'s one trainer.

A runner takes the source model, one target person's data and the settings, adapts on what the
method is allowed to see (PFT: the person's NEUTRAL ``adapt`` frames; the oracle: the labelled
``oracle`` frames; source-only: nothing) and returns logits on the held-out ``eval`` frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from pft.core.adaptation import (
    AdaptationData,
    AdaptationMethod,
    AdaptationTrainer,
    ModelParts,
    predict,
)
from pft.core.baselines import (
    NeutralCalibration,
    NeutralNorm,
    NRCConfig,
    SHOTConfig,
    TPDSConfig,
    baseline_translator,
    reestimate_batchnorm,
)
from pft.core.config import FrozenConfig
from pft.core.data import VideoRecord
from pft.core.frames import FrameSet, FrameStore
from pft.core.models import FeatureExtractor, style_code
from pft.core.oracle import OracleConfig, fine_tune_oracle
from pft.core.pairing import match_reference
from pft.core.personalize import PersonalizeConfig, SourceModel, pairing_query, personalize
from pft.core.training import extract_features


class MethodSettings(FrozenConfig):
    """Per-method settings: PFT's stage 3, the oracle's supervised fine-tuning (F's last block and
    C, ``pft.core.oracle``) and the baselines' (SHOT, NRC, TPDS: see ``pft.core.baselines``;
    AdaBN's batch size for re-estimating BatchNorm)."""

    pft: PersonalizeConfig = PersonalizeConfig()
    oracle: OracleConfig = OracleConfig()
    shot: SHOTConfig = SHOTConfig()
    nrc: NRCConfig = NRCConfig()
    tpds: TPDSConfig = TPDSConfig()
    adabn_batch_size: int = Field(256, ge=2)
    seed: int = Field(0, ge=0)


@dataclass
class TargetImages:
    """Face crops of a target's ``adapt``, ``eval`` and (when it has them) ``oracle`` frames, rows
    aligned with those FrameSets, and the source F, for methods that re-run F (AdaBN, the oracle)."""

    extractor: FeatureExtractor
    adapt: np.ndarray  # uint8 (N_adapt, S, S, 3)
    eval: np.ndarray  # uint8 (N_eval, S, S, 3)
    oracle: np.ndarray | None = None  # uint8 (N_oracle, S, S, 3)


@dataclass
class TargetData:
    """One target person's frames by split; ``eval`` is never shown to a method before predicting.

    ``images`` (optional) carries the face crops for methods that need them (AdaBN); build it with
    :func:`target_images`.
    """

    subject: str
    adapt: FrameSet
    oracle: FrameSet | None
    eval: FrameSet
    images: TargetImages | None = None


def target_images(
    store: FrameStore,
    extractor: FeatureExtractor,
    adapt_records: Sequence[VideoRecord],
    eval_records: Sequence[VideoRecord],
    oracle_records: Sequence[VideoRecord] = (),
) -> TargetImages:
    """The crops of ``adapt_records``, ``eval_records`` and ``oracle_records`` in
    ``FrameStore.frame_set``'s row order (records in order, videos without usable frames skipped)."""

    def crops(records: Sequence[VideoRecord]) -> np.ndarray:
        parts = [store.videos[r.path].crops for r in records if r.path in store.videos]
        if not parts:
            raise ValueError("none of these videos has usable face frames")
        return np.concatenate(parts)

    oracle = crops(oracle_records) if any(r.path in store.videos for r in oracle_records) else None
    return TargetImages(extractor, crops(adapt_records), crops(eval_records), oracle)


IMAGE_METHODS = frozenset({"adabn", "oracle"})
"""Methods that re-run F on face crops (their ``TargetData.images`` must be set)."""


@dataclass
class MethodOutcome:
    """Logits on the eval frames, the adaptation's cost, and (for translators) translated features."""

    logits: Tensor
    iterations: int
    seconds: float
    translated: Tensor | None = None
    converged: bool | None = None
    trainable_parameters: int = 0
    privacy: dict[str, Any] | None = None  # the DP release (epsilon, delta, unit, accountant...) if any


Runner = Callable[[SourceModel, TargetData, MethodSettings, int], MethodOutcome]


@torch.no_grad()
def run_source_only(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """The source model as it ships: ``C(F(x))``, no adaptation."""
    model.classifier.eval()
    return MethodOutcome(model.classifier(target.eval.features), 0, 0.0, converged=True)


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
    adapted = settings.pft.method().trainable_parameters(
        ModelParts(model.classifier, result.translator, None, result.style_target, result.style_reference)
    )
    n_params = sum(p.numel() for p in adapted)
    return MethodOutcome(
        logits,
        result.result.iterations,
        result.result.seconds,
        translated,
        result.result.converged,
        n_params,
        privacy=result.privacy.summary() if result.privacy is not None else None,
    )


def run_oracle(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """Upper bound: supervised fine-tuning of F's last block and C (copies) on the person's
    labelled ``oracle`` frames (``pft.core.oracle``), evaluated on the ``eval`` crops."""
    if target.oracle is None or len(target.oracle) == 0:
        raise ValueError(f"{target.subject}: the oracle needs labelled `oracle` videos")
    if target.images is None or target.images.oracle is None:
        raise ValueError(
            f"{target.subject}: the oracle needs the face crops of its `oracle` and `eval` videos "
            "(TargetData.images; build it with pft.core.methods.target_images)"
        )
    if len(target.images.oracle) != len(target.oracle):
        n_crops, n_frames = len(target.images.oracle), len(target.oracle)
        raise ValueError(f"{target.subject}: {n_crops} oracle crops for {n_frames} oracle frames")
    out = fine_tune_oracle(
        target.images.extractor,
        model.classifier,
        target.images.oracle,
        target.oracle.labels,
        target.images.eval,
        settings.oracle,
        seed,
        video_ids=target.oracle.video_ids,
    )
    r = out.result
    return MethodOutcome(out.logits, r.iterations, r.seconds, None, r.converged, out.trainable_parameters)


def run_neutral_calibration(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """C's neutral logit shifted per person so the person's neutral ``adapt`` frames get the mean
    neutral confidence C gives source subjects' neutral frames (``NeutralCalibration``)."""
    t0 = time.perf_counter()
    goal = model.styles.mean_neutral_confidence()
    method = NeutralCalibration.fit(model.classifier, target.adapt.features, goal)
    seconds = time.perf_counter() - t0
    logits = predict(method, ModelParts(classifier=model.classifier), target.eval.features)
    return MethodOutcome(logits, 0, seconds, converged=True)


# --- baselines (pft.core.baselines; docs/baselines.md) -------------------------------------------------
def _reference(model: SourceModel, neutral: FrameSet, seed: int) -> str:
    """The source subject a target is matched with (the same rule as ``personalize``)."""
    query = pairing_query(model.pairing, neutral.features, neutral.mean_descriptor())
    candidates = {k: v for k, v in model.descriptors.items() if k in model.styles.codes}
    return match_reference(query, candidates, model.pairing, seed)


BaselineConfig = SHOTConfig | NRCConfig | TPDSConfig


def _run_translator_baseline(
    model: SourceModel, target: TargetData, config: BaselineConfig, seed: int
) -> MethodOutcome:
    """Adapt a copy of T with a model-based SFDA method on the NEUTRAL ``adapt`` frames; C frozen."""
    neutral = target.adapt
    reference = _reference(model, neutral, seed)
    translator = baseline_translator(model.translator, config.init)
    parts = ModelParts(
        classifier=model.classifier,
        translator=translator,
        style_target=style_code(neutral.features, neutral.frame_stats, model.normalizer).detach(),
        style_reference=model.styles.codes[reference],
    )
    data = AdaptationData(neutral.features, video_ids=neutral.video_ids, time_index=neutral.time_index)
    method: AdaptationMethod = config.method(neutral.features)
    result = AdaptationTrainer(config.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    with torch.no_grad():
        assert parts.style_target is not None and parts.style_reference is not None
        translated = translator(target.eval.features, parts.style_target, parts.style_reference)
    logits = predict(method, parts, target.eval.features)
    n_params = sum(p.numel() for p in method.trainable_parameters(parts))
    return MethodOutcome(logits, result.iterations, result.seconds, translated, result.converged, n_params)


def run_shot(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """SHOT (Liang et al. 2020) on T, C frozen, the person's neutral frames only."""
    return _run_translator_baseline(model, target, settings.shot, seed)


def run_nrc(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """NRC (Yang et al. 2021) on T, C frozen, the person's neutral frames only."""
    return _run_translator_baseline(model, target, settings.nrc, seed)


def run_tpds(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """TPDS (Tang et al. 2024) on T, C frozen, the person's neutral frames only."""
    return _run_translator_baseline(model, target, settings.tpds, seed)


def _run_neutral_norm(
    model: SourceModel, target: TargetData, reference: Literal["source_mean", "matched"], seed: int
) -> MethodOutcome:
    t0 = time.perf_counter()
    styles = model.styles
    if reference == "matched":
        name = _reference(model, target.adapt, seed)
        ref = (styles.neutral_mean[name], styles.neutral_std[name])
    else:
        names = sorted(styles.neutral_mean)
        ref = (
            torch.stack([styles.neutral_mean[n] for n in names]).mean(0),
            torch.stack([styles.neutral_std[n] for n in names]).mean(0),
        )
    method = NeutralNorm.from_neutral(target.adapt.features, ref)
    seconds = time.perf_counter() - t0
    logits = predict(method, ModelParts(classifier=model.classifier), target.eval.features)
    return MethodOutcome(logits, 0, seconds, converged=True)


def run_neutral_norm(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """Per-person neutral normalisation to the MEAN source neutral statistics; ``C(f')``."""
    return _run_neutral_norm(model, target, "source_mean", seed)


def run_neutral_norm_matched(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """Per-person neutral normalisation to the MATCHED reference subject's neutral statistics."""
    return _run_neutral_norm(model, target, "matched", seed)


def run_adabn(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """AdaBN (Li et al. 2016): F's BatchNorm statistics re-estimated on the person's neutral crops;
    eval features recomputed with that F (never written to the feature cache); ``C(F'(x))``."""
    if target.images is None:
        raise ValueError(
            f"{target.subject}: adabn needs the face crops (TargetData.images; build it with "
            "pft.core.methods.target_images)"
        )
    t0 = time.perf_counter()
    adapted = reestimate_batchnorm(target.images.extractor, target.images.adapt, settings.adabn_batch_size)
    seconds = time.perf_counter() - t0
    features, _ = extract_features(adapted, target.images.eval)
    if len(features) != len(target.eval):
        raise ValueError(f"{target.subject}: {len(features)} eval crops for {len(target.eval)} eval frames")
    with torch.no_grad():
        model.classifier.eval()
        logits = model.classifier(features)
    return MethodOutcome(logits, 0, seconds, converged=True)


METHODS: dict[str, Runner] = {
    "source_only": run_source_only,
    "pft": run_pft,
    "oracle": run_oracle,
    "shot": run_shot,
    "nrc": run_nrc,
    "tpds": run_tpds,
    "neutral_calibration": run_neutral_calibration,
    "neutral_norm": run_neutral_norm,
    "neutral_norm_matched": run_neutral_norm_matched,
    "adabn": run_adabn,
}
