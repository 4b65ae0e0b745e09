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
    AdaptResult,
    ModelParts,
    predict,
)
from pft.core.baselines import (
    NeutralCalibration,
    NeutralNorm,
    NRCConfig,
    SHOTConfig,
    TPDSConfig,
    TranslatorInit,
    baseline_translator,
    reestimate_batchnorm,
)
from pft.core.config import FrozenConfig
from pft.core.data import VideoRecord
from pft.core.frames import FrameSet, FrameStore
from pft.core.image_translation import (
    DSFDAConfig,
    ExpressionGeneration,
    SFDAITConfig,
    SFITConfig,
    SourceStyleTranslation,
    TargetToSourceTranslation,
    TranslatorDistillation,
    TranslatorSupervision,
    crops_to_images,
    expression_projection,
    seeded_generator,
    translated_features,
)
from pft.core.models import FeatureExtractor, style_code
from pft.core.oracle import OracleConfig, fine_tune_oracle
from pft.core.pairing import match_reference
from pft.core.personalize import PersonalizeConfig, SourceModel, pairing_query, personalize
from pft.core.training import extract_features


class MethodSettings(FrozenConfig):
    """Per-method settings: PFT's stage 3, the oracle's supervised fine-tuning (F's last block and
    C, ``pft.core.oracle``) and the baselines' (SHOT, NRC, TPDS: see ``pft.core.baselines``;
    SFDA-IT, SFIT, DSFDA: see ``pft.core.image_translation``; AdaBN's batch size for re-estimating
    BatchNorm)."""

    pft: PersonalizeConfig = PersonalizeConfig()
    oracle: OracleConfig = OracleConfig()
    shot: SHOTConfig = SHOTConfig()
    nrc: NRCConfig = NRCConfig()
    tpds: TPDSConfig = TPDSConfig()
    sfda_it: SFDAITConfig = SFDAITConfig()
    sfit: SFITConfig = SFITConfig()
    dsfda: DSFDAConfig = DSFDAConfig()
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


IMAGE_METHODS = frozenset({"adabn", "oracle", "sfda_it", "sfit", "dsfda"})
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


def _translator_parts(
    model: SourceModel, neutral: FrameSet, init: TranslatorInit, seed: int
) -> tuple[ModelParts, AdaptationData]:
    """A copy of T (``init``), the person's and the matched reference's style codes, C; and the
    person's neutral features as the trainer's data."""
    reference = _reference(model, neutral, seed)
    parts = ModelParts(
        classifier=model.classifier,
        translator=baseline_translator(model.translator, init),
        style_target=style_code(neutral.features, neutral.frame_stats, model.normalizer).detach(),
        style_reference=model.styles.codes[reference],
    )
    data = AdaptationData(neutral.features, video_ids=neutral.video_ids, time_index=neutral.time_index)
    return parts, data


def _adapt_translator_baseline(
    model: SourceModel, target: TargetData, config: BaselineConfig, seed: int
) -> tuple[ModelParts, AdaptationMethod, AdaptResult]:
    """A copy of T adapted with a model-based SFDA method on the NEUTRAL ``adapt`` frames; C frozen."""
    parts, data = _translator_parts(model, target.adapt, config.init, seed)
    method: AdaptationMethod = config.method(target.adapt.features)
    result = AdaptationTrainer(config.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    return parts, method, result


def _run_translator_baseline(
    model: SourceModel, target: TargetData, config: BaselineConfig, seed: int
) -> MethodOutcome:
    """Adapt a copy of T with a model-based SFDA method on the NEUTRAL ``adapt`` frames; C frozen."""
    parts, method, result = _adapt_translator_baseline(model, target, config, seed)
    translator = parts.translator
    assert translator is not None
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


# --- data-based SFDA: image-space generators (pft.core.image_translation; docs/baselines.md) ----------
def _adapt_images(target: TargetData, name: str) -> tuple[TargetImages, Tensor, Tensor]:
    """The person's crops and F's inputs of their ``adapt`` and ``eval`` crops (rows checked
    against the FrameSets)."""
    images = target.images
    if images is None:
        raise ValueError(
            f"{target.subject}: {name} needs the face crops (TargetData.images; build it with "
            "pft.core.methods.target_images)"
        )
    for split, crops, frames in (("adapt", images.adapt, target.adapt), ("eval", images.eval, target.eval)):
        if len(crops) != len(frames):
            raise ValueError(f"{target.subject}: {len(crops)} {split} crops for {len(frames)} {split} frames")
    extractor = images.extractor
    return images, crops_to_images(extractor, images.adapt), crops_to_images(extractor, images.eval)


def _param_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def run_sfda_it(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """SFDA-IT (Hou & Zheng 2021): G translates the person's neutral crops to the source style
    (F's BatchNorm statistics, the source prediction kept), then T is adapted so ``C(T(F(x)))``
    matches ``C(F(G(x)))``; ``C(T(F(x)))`` on the eval frames. F and C frozen."""
    images, x_adapt, _ = _adapt_images(target, "sfda_it")
    cfg, neutral = settings.sfda_it, target.adapt
    t0 = time.perf_counter()
    extractor, classifier = images.extractor.eval(), model.classifier.eval()
    with torch.no_grad():
        source_logits = classifier(neutral.features)
    generator = seeded_generator(cfg.generator, seed)
    g_parts = ModelParts(classifier=classifier, extractor=extractor, generator=generator)
    g_data = AdaptationData(x_adapt, video_ids=neutral.video_ids, time_index=neutral.time_index)
    g_method = SourceStyleTranslation(source_logits, cfg.lambda_bn, cfg.lambda_kd, cfg.temperature)
    g_result = AdaptationTrainer(cfg.generator_adapt.model_copy(update={"seed": seed})).fit(
        g_method, g_parts, g_data
    )
    with torch.no_grad():
        teacher = classifier(translated_features(generator, extractor, x_adapt))
    parts, data = _translator_parts(model, neutral, cfg.init, seed)
    method = TranslatorDistillation(teacher, cfg.temperature)
    result = AdaptationTrainer(cfg.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    logits = predict(method, parts, target.eval.features)
    assert parts.translator is not None
    return MethodOutcome(
        logits,
        g_result.iterations + result.iterations,
        time.perf_counter() - t0,
        converged=g_result.converged and result.converged,
        trainable_parameters=_param_count(generator, parts.translator),
    )


def run_sfit(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """SFIT (Hou & Zheng, CVPR 2021): the adapted target model is the project's SHOT (T adapted,
    C frozen); G translates the person's neutral crops so that the source model on ``G(x)`` agrees
    with it on ``x`` (distillation, relationship preservation, F's BatchNorm statistics); the source
    model on the translated eval crops, ``C(F(G(x)))``. F and C frozen."""
    images, x_adapt, x_eval = _adapt_images(target, "sfit")
    cfg, neutral = settings.sfit, target.adapt
    t0 = time.perf_counter()
    shot_parts, _, shot_result = _adapt_translator_baseline(model, target, cfg.shot, seed)
    translator, s_t, s_r = shot_parts.require_translation()
    extractor, classifier = images.extractor.eval(), model.classifier.eval()
    with torch.no_grad():
        target_features = translator(neutral.features, s_t, s_r)
        target_logits = classifier(target_features)
    generator = seeded_generator(cfg.generator, seed)
    g_parts = ModelParts(classifier=classifier, extractor=extractor, generator=generator)
    g_data = AdaptationData(x_adapt, video_ids=neutral.video_ids, time_index=neutral.time_index)
    g_method = TargetToSourceTranslation(
        target_logits, target_features, cfg.lambda_kd, cfg.lambda_rp, cfg.lambda_bn, cfg.temperature
    )
    g_result = AdaptationTrainer(cfg.generator_adapt.model_copy(update={"seed": seed})).fit(
        g_method, g_parts, g_data
    )
    with torch.no_grad():
        translated = translated_features(generator, extractor, x_eval)
        logits = classifier(translated)
    return MethodOutcome(
        logits,
        shot_result.iterations + g_result.iterations,
        time.perf_counter() - t0,
        translated,
        converged=shot_result.converged and g_result.converged,
        trainable_parameters=_param_count(generator, translator),
    )


def run_dsfda(model: SourceModel, target: TargetData, settings: MethodSettings, seed: int) -> MethodOutcome:
    """DSFDA (Sharafi et al. 2025): a class-conditioned G generates the person's missing
    non-neutral crops from their neutral ones (expression from the source model, identity kept,
    self-supervised reconstruction); T is adapted with cross-entropy on the neutral frames and
    the generated ones; ``C(T(F(x)))`` on the eval frames. F and C frozen."""
    images, x_adapt, _ = _adapt_images(target, "dsfda")
    cfg, neutral = settings.dsfda, target.adapt
    num_classes = model.classifier.fc.out_features
    if not 0 <= cfg.neutral_class < num_classes:
        raise ValueError(f"dsfda: neutral_class {cfg.neutral_class} is not one of {num_classes} classes")
    t0 = time.perf_counter()
    extractor, classifier = images.extractor.eval(), model.classifier.eval()
    generator = seeded_generator(cfg.generator, seed, num_classes)
    g_parts = ModelParts(classifier=classifier, extractor=extractor, generator=generator)
    g_data = AdaptationData(x_adapt, video_ids=neutral.video_ids, time_index=neutral.time_index)
    g_method = ExpressionGeneration(
        neutral.features,
        expression_projection(classifier),
        num_classes,
        cfg.neutral_class,
        cfg.lambda_expr,
        cfg.lambda_id,
        cfg.lambda_rec,
    )
    g_result = AdaptationTrainer(cfg.generator_adapt.model_copy(update={"seed": seed})).fit(
        g_method, g_parts, g_data
    )
    draw = torch.Generator().manual_seed(seed)
    features, labels = [neutral.features], [torch.full((len(neutral),), cfg.neutral_class, dtype=torch.long)]
    for _ in range(cfg.generated_per_frame):
        requested = g_method.requested(len(neutral), draw)
        features.append(translated_features(generator, extractor, x_adapt, requested))
        labels.append(requested)
    parts, _ = _translator_parts(model, neutral, cfg.init, seed)
    data = AdaptationData(torch.cat(features), labels=torch.cat(labels))
    method = TranslatorSupervision()
    result = AdaptationTrainer(cfg.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    logits = predict(method, parts, target.eval.features)
    assert parts.translator is not None
    return MethodOutcome(
        logits,
        g_result.iterations + result.iterations,
        time.perf_counter() - t0,
        converged=g_result.converged and result.converged,
        trainable_parameters=_param_count(generator, parts.translator),
    )


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
    "sfda_it": run_sfda_it,
    "sfit": run_sfit,
    "dsfda": run_dsfda,
}
