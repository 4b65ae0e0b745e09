"""The methods an experiment compares, each a small runner over ``pft.core``'s one trainer.

A runner takes the source model, one target person's data and the settings, adapts on what the
method is allowed to see (PFT: the person's NEUTRAL ``adapt`` frames; the oracle: the labelled
``oracle`` frames; source-only: nothing) and returns logits on the held-out ``eval`` frames.

The registry :data:`METHODS` holds the built-in runners and those added from outside the package
with :func:`register_method` or the ``pft.methods`` entry-point group (docs/extending.md).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from pft.core.adaptation import (
    AdaptationData,
    AdaptationMethod,
    AdaptationTrainer,
    AdaptConfig,
    AdaptResult,
    ModelParts,
    TranslatorSupervision,
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
    ImageGenerator,
    SFDAITConfig,
    SFITConfig,
    SourceStyleTranslation,
    TargetToSourceTranslation,
    TranslatorDistillation,
    crops_to_images,
    expression_projection,
    seeded_generator,
    translated_features,
)
from pft.core.models import Classifier, FeatureExtractor, style_code
from pft.core.oracle import OracleConfig, fine_tune_oracle
from pft.core.pairing import match_reference
from pft.core.personalize import PersonalizeConfig, SourceModel, pairing_query, personalize, translation_goal
from pft.core.plugins import METHODS_GROUP, PluginError, check_name, load_entry_points
from pft.core.results import METHOD_GROUPS, UPPER_BOUNDS, register_row
from pft.core.training import extract_features

M = TypeVar("M", bound=BaseModel)


class MethodSettings(FrozenConfig):
    """Per-method settings: PFT's stage 3, the oracle's supervised fine-tuning (F's last block and
    C, ``pft.core.oracle``) and the baselines' (SHOT, NRC, TPDS: see ``pft.core.baselines``;
    SFDA-IT, SFIT, DSFDA: see ``pft.core.image_translation``; AdaBN's batch size for re-estimating
    BatchNorm).

    A method registered with a config model (:func:`register_method`) takes its settings under its
    own name (``settings: {my_method: {...}}`` in a config file), validated by that model; read
    them with :meth:`method_config`.
    """

    # extra keys are allowed only for registered methods' settings (checked in _registered)
    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

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

    @model_validator(mode="before")
    @classmethod
    def _registered(cls, data: Any) -> Any:
        """Validate every key that is not a field by the config model of the method of that name."""
        if not isinstance(data, dict):
            return data
        extra = [k for k in data if k not in cls.model_fields]
        if not extra:
            return data
        names = method_names()  # reads the entry points the first time
        out = dict(data)
        for key in extra:
            model = _SPECS[key].config if key in names and key in _SPECS else None
            if model is None:
                with_settings = sorted(n for n, spec in _SPECS.items() if spec.config is not None)
                raise ValueError(
                    f"unknown setting {key!r}: not a MethodSettings field, and no registered method "
                    f"of that name has a config model (registered with one: {with_settings})"
                )
            value = data[key]
            out[key] = value if isinstance(value, model) else model.model_validate(value)
        return out

    def method_config(self, name: str, model: type[M]) -> M:
        """The settings of registered method ``name``: those given, else ``model()``'s defaults."""
        given = (self.model_extra or {}).get(name)
        if given is None:
            return model()
        if not isinstance(given, model):
            raise TypeError(f"the settings of {name!r} are a {type(given).__name__}, not a {model.__name__}")
        return given

    def with_defaults(self, methods: Sequence[str]) -> MethodSettings:
        """These settings with the defaults of every method in ``methods`` that has a config model
        and no settings here (so a run's resolved config records what each method ran with)."""
        extra = self.model_extra or {}
        missing = {
            m: spec.config()
            for m in methods
            if (spec := _SPECS.get(m)) is not None and spec.config is not None and m not in extra
        }
        return self.model_copy(update=missing) if missing else self


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
"""Built-in methods that re-run F on face crops (their ``TargetData.images`` must be set); for
any method, registered ones included, ask :func:`needs_images`."""


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


def run_oracle_bias(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    """Upper bound of bias-only stage 3 (``TranslatorSupervision(bias_only=True)``): a copy of
    T with only its output bias trained on the person's labelled ``oracle`` frames (the oracle's
    trainer settings, ``settings.oracle.adapt``), the style codes and reference of stage 3 taken
    from the neutral ``adapt`` frames as in ``pft``; evaluated as ``C(T(f))`` on ``eval``."""
    if target.oracle is None or len(target.oracle) == 0:
        raise ValueError(f"{target.subject}: oracle_bias needs labelled `oracle` frames")
    neutral = target.adapt
    goal = translation_goal(
        model,
        neutral.features,
        neutral.frame_stats,
        settings.pft.model_copy(update={"seed": seed}),
        descriptor=neutral.mean_descriptor(),
    )
    parts = ModelParts(
        classifier=model.classifier,
        translator=copy.deepcopy(model.translator),
        style_target=goal.style_target,
        style_reference=goal.style_reference,
    )
    method = TranslatorSupervision(name="oracle_bias", bias_only=True)
    data = AdaptationData(
        features=target.oracle.features, labels=target.oracle.labels.long(), video_ids=target.oracle.video_ids
    )
    result = AdaptationTrainer(settings.oracle.adapt.model_copy(update={"seed": seed})).fit(
        method, parts, data
    )
    with torch.no_grad():
        logits = method.predict(parts, target.eval.features)
    n_params = sum(p.numel() for p in method.trainable_parameters(parts))
    return MethodOutcome(logits, result.iterations, result.seconds, None, result.converged, n_params)


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


def _fit_generator(
    generator: ImageGenerator,
    method: AdaptationMethod,
    extractor: FeatureExtractor,
    classifier: Classifier,
    x_adapt: Tensor,
    neutral: FrameSet,
    adapt: AdaptConfig,
    seed: int,
) -> AdaptResult:
    """Train image generator G (only G: F and C frozen) with ``method`` on the person's neutral
    crops ``x_adapt`` on the shared trainer: the first half of every image-space method."""
    parts = ModelParts(classifier=classifier, extractor=extractor, generator=generator)
    data = AdaptationData(x_adapt, video_ids=neutral.video_ids, time_index=neutral.time_index)
    return AdaptationTrainer(adapt.model_copy(update={"seed": seed})).fit(method, parts, data)


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
    g_method = SourceStyleTranslation(source_logits, cfg.lambda_bn, cfg.lambda_kd, cfg.temperature)
    g_result = _fit_generator(
        generator, g_method, extractor, classifier, x_adapt, neutral, cfg.generator_adapt, seed
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
    g_method = TargetToSourceTranslation(
        target_logits, target_features, cfg.lambda_kd, cfg.lambda_rp, cfg.lambda_bn, cfg.temperature
    )
    g_result = _fit_generator(
        generator, g_method, extractor, classifier, x_adapt, neutral, cfg.generator_adapt, seed
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
    g_method = ExpressionGeneration(
        neutral.features,
        expression_projection(classifier),
        num_classes,
        cfg.neutral_class,
        cfg.lambda_expr,
        cfg.lambda_id,
        cfg.lambda_rec,
    )
    g_result = _fit_generator(
        generator, g_method, extractor, classifier, x_adapt, neutral, cfg.generator_adapt, seed
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


METHODS: dict[str, Runner] = {  # built-ins first, then registered methods
    "source_only": run_source_only,
    "pft": run_pft,
    "oracle": run_oracle,
    "oracle_bias": run_oracle_bias,
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

#: the methods that ship with the package (in the order of :data:`METHODS`)
BUILTIN_METHODS: tuple[str, ...] = tuple(METHODS)


@dataclass(frozen=True)
class MethodSpec:
    """A method to register: its runner and what the experiment needs to know about it.

    Attributes
    ----------
    runner:
        ``runner(model, target, settings, seed) -> MethodOutcome`` (:data:`Runner`).
    config:
        A pydantic model of the method's settings (``settings.<name>`` in an experiment config,
        validated by it; read with ``settings.method_config(name, config)``), or ``None``.
    needs_images:
        The runner re-runs F on face crops: ``target.images`` is set for it.
    source_free:
        The runner adapts without labels of the target (the default). Only a method that is not
        source-free is given the target's labelled ``oracle`` frames; it is reported as an upper
        bound (never bold in the table).
    group:
        The row group of the paper-style table it is listed in (e.g. ``"SFDA (model-based)"``;
        ``pft.core.results.METHOD_GROUPS``); default ``"Other"``.
    """

    runner: Runner
    config: type[BaseModel] | None = None
    needs_images: bool = False
    source_free: bool = True
    group: str = "Other"


_SPECS: dict[str, MethodSpec] = {
    name: MethodSpec(
        runner,
        needs_images=name in IMAGE_METHODS,
        source_free=name not in UPPER_BOUNDS,
        group=next((g for g, members in METHOD_GROUPS if name in members), "Other"),
    )
    for name, runner in METHODS.items()
}


def register_method(
    name: str,
    runner: Runner | MethodSpec,
    config_model: type[BaseModel] | None = None,
    *,
    needs_images: bool = False,
    source_free: bool = True,
    group: str = "Other",
    replace: bool = False,
) -> None:
    """Add a method to :data:`METHODS`: ``pft simulate --methods NAME``, ``pft benchmark`` and
    ``run_experiment`` then run it like the built-in ones (docs/extending.md).

    ``runner`` is a :data:`Runner` (the keyword arguments describe it, see :class:`MethodSpec`) or
    a whole :class:`MethodSpec`. A built-in name or a :class:`MethodSettings` field cannot be
    taken; another registered name only with ``replace=True`` (registering the same runner again
    does nothing).
    """
    check_name("method", name)
    spec = (
        runner
        if isinstance(runner, MethodSpec)
        else MethodSpec(runner, config_model, needs_images, source_free, group)
    )
    if not callable(spec.runner):
        raise PluginError(f"method {name!r}: the runner {spec.runner!r} is not callable")
    if spec.config is not None and not (isinstance(spec.config, type) and issubclass(spec.config, BaseModel)):
        raise PluginError(f"method {name!r}: the config model must be a pydantic BaseModel class")
    if name in BUILTIN_METHODS or name in MethodSettings.model_fields:
        raise PluginError(f"method name {name!r} is taken by the package")
    if name in _SPECS and _SPECS[name] != spec and not replace:
        raise PluginError(f"method {name!r} is already registered (pass replace=True to replace it)")
    _SPECS[name] = spec
    METHODS[name] = spec.runner
    register_row(name, spec.group, upper_bound=not spec.source_free)


def _register_entry_point(name: str, obj: object) -> None:
    if not (isinstance(obj, MethodSpec) or callable(obj)):
        raise PluginError(f"a pft.methods entry point must be a MethodSpec or a runner, got {obj!r}")
    register_method(name, obj)


def method_names() -> tuple[str, ...]:
    """Every method's name: the built-ins, then the registered ones (entry points read first)."""
    load_entry_points(METHODS_GROUP, _register_entry_point)
    return tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    """What is known of method ``name`` (entry points read first); ``KeyError`` if unknown."""
    if name not in METHODS and name not in method_names():  # entry points read for another name
        raise KeyError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return replace(_SPECS[name], runner=METHODS[name]) if name in _SPECS else MethodSpec(METHODS[name])


def needs_images(name: str) -> bool:
    """Whether method ``name`` re-runs F on face crops (``TargetData.images`` must be set)."""
    return method_spec(name).needs_images


def method_input(name: str, target: TargetData) -> TargetData:
    """What method ``name`` is given of a target: a source-free method gets no ``oracle`` frames
    (nor their crops); only a method registered as not source-free (the oracle) sees them."""
    if not method_spec(name).source_free or (target.oracle is None and target.images is None):
        return target
    images = target.images
    if images is not None and images.oracle is not None:
        images = replace(images, oracle=None)
    return replace(target, oracle=None, images=images)
