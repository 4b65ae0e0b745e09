"""The paper's data-based SFDA rows: image-space generators over the ONE adaptation trainer.

Each method trains a small residual convolutional generator G on the person's NEUTRAL ``adapt``
face crops (the trainer's ``features`` are the preprocessed crops, (N, 3, S, S) in [-1, 1]),
with F and C frozen, then (SFDA-IT, DSFDA) adapts T on F's features the way the model-based
baselines do (``pft.core.baselines``: C frozen, T from the identity). Everything is written from
the papers' descriptions (docs/baselines.md says what is kept and what is scaled down):

- ``SFDA-IT`` (Hou & Zheng 2021, arXiv 2008.07514, "Source free domain adaptation with image
  translation"): G maps target crops to the source style - the batch statistics of F's
  BatchNorm inputs on ``G(x)`` are pulled to the running statistics F stored on the source data
  (:func:`batchnorm_statistics_loss`) while the source model's prediction is kept
  (:func:`distillation_loss`); then T is adapted so that ``C(T(F(x)))`` agrees with the source
  model on the translated image ``C(F(G(x)))``.
- ``SFIT`` (Hou & Zheng, CVPR 2021, "Visualizing adapted knowledge in domain transfer"): G
  translates target crops so that the SOURCE model on ``G(x)`` agrees with an ADAPTED TARGET model
  on ``x`` (distillation), with BatchNorm-statistics matching against F and a relationship-
  preserving loss (:func:`relationship_loss`) between the two branches' features; the adapted
  target model is the project's SHOT (``pft.core.baselines.SHOT`` on T). Prediction: the source
  model on the translated eval crops.
- ``DSFDA`` (Sharafi et al. 2025, arXiv 2503.20771): a class-conditioned G generates the missing
  non-neutral crops of the person from their neutral ones. Expression and identity are
  disentangled in F's feature space: the expression part is what C reads (the row space of its
  weight), the identity part the rest (:func:`identity_loss` keeps it); the source model must
  see the requested expression on the generated crop (cross-entropy), and a self-supervised
  reconstruction (:func:`reconstruction_loss`) asks G to give back the neutral input when asked
  for neutral, from the input and from its own generated crop (the identity survives the round
  trip). T is then adapted with cross-entropy on the neutral frames (label neutral) and the
  generated ones (the requested label).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F_nn
from pydantic import Field
from torch import Tensor, nn

from pft.core.adaptation import AdaptConfig, Batch, ModelParts
from pft.core.baselines import SHOTConfig, TranslatorInit
from pft.core.config import FrozenConfig
from pft.core.losses import classification_loss
from pft.core.models import Classifier, FeatureExtractor, preprocess

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# --- the generator ---------------------------------------------------------------------------------
class GeneratorConfig(FrozenConfig):
    """G's size: ``channels`` wide, ``blocks`` residual blocks, working at ``1 / stride`` of the
    crop's resolution (the first convolution strides, the residual is upsampled bilinearly).

    The last convolution starts at ``init_std`` (not zero, so every layer gets a gradient at
    step 1), so ``G(x) ~= x`` at the start: the methods start from the source model."""

    channels: int = Field(12, ge=1)
    blocks: int = Field(2, ge=1)
    stride: int = Field(2, ge=1)
    init_std: float = Field(1e-3, ge=0)


class ImageGenerator(nn.Module):
    """G: ``G(x, y) = x + up(r(x, y))``, r a residual convolutional net (3x3 convolutions, ReLU)
    at ``1 / stride`` of the resolution, ``up`` a bilinear upsampling to the image's size.

    With ``num_classes > 0`` (DSFDA) the requested class ``y`` enters as one-hot constant maps
    concatenated to the image; otherwise (SFIT, SFDA-IT) G sees the image only. Images are
    (N, 3, S, S) in [-1, 1]; the output is not clamped (F takes any float image).
    """

    def __init__(self, config: GeneratorConfig, num_classes: int = 0) -> None:
        super().__init__()
        c = config.channels
        self.num_classes = num_classes
        self.inp = nn.Conv2d(3 + num_classes, c, 3, config.stride, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))
            for _ in range(config.blocks)
        )
        self.out = nn.Conv2d(c, 3, 3, 1, 1)
        nn.init.normal_(self.out.weight, std=config.init_std)
        assert self.out.bias is not None
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Translated images (N, 3, S, S); ``labels`` (N,) is required iff ``num_classes > 0``."""
        h = x
        if self.num_classes:
            if labels is None:
                raise ValueError("this generator is class-conditioned: pass labels")
            onehot = F_nn.one_hot(labels.long(), self.num_classes).to(x.dtype)
            h = torch.cat([x, onehot[:, :, None, None].expand(-1, -1, *x.shape[-2:])], dim=1)
        h = F_nn.relu(self.inp(h))
        for block in self.blocks:
            h = F_nn.relu(h + block(h))
        r = self.out(h)
        if r.shape[-2:] != x.shape[-2:]:
            r = F_nn.interpolate(r, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x + r

    def param_count(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())


# --- loss terms ------------------------------------------------------------------------------------
def bn_statistics_distance(
    means: list[Tensor], variances: list[Tensor], running_means: list[Tensor], running_vars: list[Tensor]
) -> Tensor:
    """``sum_l ||mu_l - mu_bar_l||_2 + ||sigma2_l - sigma2_bar_l||_2`` over BatchNorm layers l:
    the batch mean and (biased) variance of each layer's input against its stored running ones."""
    terms = [
        torch.linalg.vector_norm(m - rm) + torch.linalg.vector_norm(v - rv)
        for m, v, rm, rv in zip(means, variances, running_means, running_vars, strict=True)
    ]
    return torch.stack(terms).sum()


@contextmanager
def batchnorm_inputs(module: nn.Module) -> Iterator[list[tuple[nn.Module, Tensor]]]:
    """Collect (BatchNorm layer, its input) for every BatchNorm layer ``module`` runs in the block."""
    seen: list[tuple[nn.Module, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, _out: seen.append((mod, args[0])))
        for m in module.modules()
        if isinstance(m, _BATCH_NORMS)
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def batchnorm_statistics_loss(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``module(x)`` and the BatchNorm-statistics matching loss of ``x`` against ``module``'s
    running statistics (:func:`bn_statistics_distance`; the source model's stored source
    statistics, DeepInversion-style). ``module`` should be in eval mode (its statistics frozen)."""
    with batchnorm_inputs(module) as seen:
        out = module(x)
    if not seen:
        raise ValueError("batchnorm_statistics_loss needs a module with BatchNorm layers")
    means, variances, r_means, r_vars = [], [], [], []
    for bn, h in seen:
        dims = [0] if h.ndim == 2 else [0, *range(2, h.ndim)]
        means.append(h.mean(dims))
        variances.append(h.var(dims, unbiased=False))
        r_mean, r_var = bn.running_mean, bn.running_var
        if not isinstance(r_mean, Tensor) or not isinstance(r_var, Tensor):
            raise ValueError("BatchNorm-statistics matching needs layers that track running statistics")
        r_means.append(r_mean)
        r_vars.append(r_var)
    return out, bn_statistics_distance(means, variances, r_means, r_vars)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean_i KL(softmax(z_t / T) || softmax(z_s / T))`` (Hinton et al.); the teacher is
    detached."""
    p_t = F_nn.softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_s = F_nn.log_softmax(student_logits / temperature, dim=1)
    kl = (p_t * (torch.log(p_t.clamp_min(1e-12)) - log_p_s)).sum(1).mean()
    return kl * temperature**2


def relationship_matrix(features: Tensor) -> Tensor:
    """The batch's normalised similarity matrix: ``G = A A^T`` (A the flattened rows), each row
    L2-normalised (Tung & Mori 2019, as SFIT's relationship-preserving loss)."""
    a = features.reshape(len(features), -1)
    return F_nn.normalize(a @ a.T, dim=1)


def relationship_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """``||G(student) - G(teacher)||_F^2 / B^2`` (teacher detached): the pairwise relations between
    frames of a batch are preserved across the two branches, whatever their feature sizes."""
    b = len(student)
    diff = relationship_matrix(student) - relationship_matrix(teacher.detach())
    return diff.pow(2).sum() / b**2


def expression_projection(classifier: Classifier) -> Tensor:
    """``P = I - W^+ W`` (D, D): the projection onto the null space of C's weight W (K, D) - the
    part of a feature that C does not read (identity), the rest being expression."""
    w, _ = classifier.linear_map()
    w = w.double()
    p = torch.eye(w.shape[1], dtype=w.dtype) - torch.linalg.pinv(w) @ w
    return p.float()


def identity_loss(generated: Tensor, source: Tensor, projection: Tensor) -> Tensor:
    """``mean_i ||P (f_gen_i - f_i)||^2 / D``: the identity part of the generated frame's feature
    equals that of the neutral frame it came from (``source`` detached)."""
    diff = (generated - source.detach()) @ projection.T
    return diff.pow(2).sum(1).mean() / generated.shape[1]


def reconstruction_loss(reconstructed: Tensor, original: Tensor) -> Tensor:
    """Mean absolute pixel error ``mean |x_rec - x|`` (``original`` detached)."""
    return (reconstructed - original.detach()).abs().mean()


# --- helpers ---------------------------------------------------------------------------------------
def _generator(parts: ModelParts) -> ImageGenerator:
    if not isinstance(parts.generator, ImageGenerator):
        raise ValueError("this method needs ModelParts.generator (an ImageGenerator)")
    return parts.generator


def _extractor(parts: ModelParts) -> FeatureExtractor:
    if parts.extractor is None:
        raise ValueError("this method needs ModelParts.extractor (F)")
    return parts.extractor


@torch.no_grad()
def translated_features(
    generator: ImageGenerator | None,
    extractor: FeatureExtractor,
    images: Tensor,
    labels: Tensor | None = None,
    batch_size: int = 128,
) -> Tensor:
    """``F(G(x, y))`` (``F(x)`` without G) of preprocessed images, in batches, every module in eval
    mode."""
    extractor.eval()
    if generator is not None:
        generator.eval()
    out = []
    for k in range(0, len(images), batch_size):
        x = images[k : k + batch_size]
        if generator is not None:
            x = generator(x, None if labels is None else labels[k : k + batch_size])
        out.append(extractor(x))
    return torch.cat(out)


def crops_to_images(extractor: FeatureExtractor, crops: np.ndarray) -> Tensor:
    """uint8 crops (N, S, S, 3) -> F's input (N, 3, S, S) in [-1, 1]."""
    return preprocess(crops, extractor.config.image_size)


# --- methods on the trainer -----------------------------------------------------------------------
@dataclass
class SourceStyleTranslation:
    """SFDA-IT's translation stage: G trained so ``G(x)`` has the source style,
    ``L = lambda_bn * L_BN(F, G(x)) + lambda_kd * KD(C(F(G(x))) <- C(F(x)))``.

    ``source_logits`` (N, K) are the source model's logits on the original crops (precomputed
    once; rows are the trainer's frame indices). F and C frozen, G trained."""

    source_logits: Tensor
    lambda_bn: float = 1.0
    lambda_kd: float = 1.0
    temperature: float = 1.0
    name: str = "sfda_it_translate"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of G's parameters."""
        return list(_generator(parts).parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """BatchNorm-statistics matching plus the source model's own prediction kept."""
        translated = _generator(parts)(batch.features)
        f, bn = batchnorm_statistics_loss(_extractor(parts), translated)
        teacher = self.source_logits[batch.index].to(f.device)
        kd = distillation_loss(parts.classifier(f), teacher, self.temperature)
        total = self.lambda_bn * bn + self.lambda_kd * kd
        return total, {"bn": float(bn.detach()), "kd": float(kd.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """The source model on translated images ``C(F(G(x)))`` (``features`` are images)."""
        return parts.classifier(_extractor(parts)(_generator(parts)(features)))


@dataclass
class TargetToSourceTranslation:
    """SFIT: G trained so that the SOURCE model on ``G(x)`` agrees with the ADAPTED target model
    on ``x``: ``L = lambda_kd * KD(C(F(G(x))) <- C(T'(F(x)))) + lambda_rp * RP(F(G(x)), T'(F(x)))
    + lambda_bn * L_BN(F, G(x))``.

    ``target_logits`` and ``target_features`` (N, K), (N, D) are the adapted target model's logits
    and features on the original crops (precomputed once; rows are the trainer's frame indices).
    F and C frozen, G trained."""

    target_logits: Tensor
    target_features: Tensor
    lambda_kd: float = 1.0
    lambda_rp: float = 1.0
    lambda_bn: float = 1.0
    temperature: float = 1.0
    name: str = "sfit"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of G's parameters."""
        return list(_generator(parts).parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Distillation + relationship preservation + BatchNorm-statistics matching."""
        translated = _generator(parts)(batch.features)
        f, bn = batchnorm_statistics_loss(_extractor(parts), translated)
        index = batch.index.to(f.device)
        kd = distillation_loss(parts.classifier(f), self.target_logits[index], self.temperature)
        rp = relationship_loss(f, self.target_features[index])
        total = self.lambda_kd * kd + self.lambda_rp * rp + self.lambda_bn * bn
        return total, {"kd": float(kd.detach()), "rp": float(rp.detach()), "bn": float(bn.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """The source model on translated images ``C(F(G(x)))`` (``features`` are images)."""
        return parts.classifier(_extractor(parts)(_generator(parts)(features)))


@dataclass
class ExpressionGeneration:
    """DSFDA's generation stage: a class-conditioned G makes the person's neutral crop ``x`` show
    expression y (drawn uniformly among the non-neutral classes from the batch's generator):
    ``L = lambda_expr * CE(C(F(G(x, y))), y) + lambda_id * ID(F(G(x, y)), F(x))
    + lambda_rec * (|G(x, n) - x| + |G(sg[G(x, y)], n) - x|)`` with n the neutral class and sg a
    stop-gradient: the reconstruction trains G's neutral branch (give back the input, and undo a
    generated expression); how far the generated crop may move is the identity term's job.

    ``source_features`` (N, D) are F's features of the neutral crops (rows are the trainer's frame
    indices); ``projection`` is :func:`expression_projection` of C. F and C frozen, G trained."""

    source_features: Tensor
    projection: Tensor
    num_classes: int
    neutral_class: int = 0
    lambda_expr: float = 1.0
    lambda_id: float = 1.0
    lambda_rec: float = 1.0
    name: str = "dsfda_generate"

    def requested(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` expressions drawn uniformly among the non-neutral classes."""
        others = torch.tensor([k for k in range(self.num_classes) if k != self.neutral_class])
        return others[torch.randint(len(others), (n,), generator=generator)]

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of G's parameters."""
        return list(_generator(parts).parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Expression cross-entropy + identity preservation + self-supervised reconstruction."""
        g, extractor = _generator(parts), _extractor(parts)
        x = batch.features
        y = self.requested(len(x), batch.generator).to(x.device)
        neutral = torch.full_like(y, self.neutral_class)
        generated = g(x, y)
        f_gen = extractor(generated)
        expr = classification_loss(parts.classifier(f_gen), y)
        ident = identity_loss(f_gen, self.source_features[batch.index.to(x.device)], self.projection)
        # the round trip trains G's neutral branch only: the generated crop is its input, detached
        rec = reconstruction_loss(g(x, neutral), x) + reconstruction_loss(g(generated.detach(), neutral), x)
        total = self.lambda_expr * expr + self.lambda_id * ident + self.lambda_rec * rec
        terms = {"expression": expr, "identity": ident, "reconstruction": rec}
        return total, {k: float(v.detach()) for k, v in terms.items()}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """The source model on images ``C(F(x))`` (G only generates training data)."""
        return parts.classifier(_extractor(parts)(features))


@dataclass
class TranslatorDistillation:
    """SFDA-IT's adaptation stage: T trained so ``C(T(F(x)))`` matches the source model on the
    translated image, ``teacher_logits = C(F(G(x)))`` (N, K; rows are the trainer's frame
    indices): ``L = KD(C(T(f)) <- teacher)``. C frozen."""

    teacher_logits: Tensor
    temperature: float = 1.0
    name: str = "sfda_it"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """All of T's parameters."""
        translator, _, _ = parts.require_translation()
        return list(translator.parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Distillation from the translated images' predictions."""
        logits = self.predict(parts, batch.features)
        kd = distillation_loss(logits, self.teacher_logits[batch.index].to(logits.device), self.temperature)
        return kd, {"kd": float(kd.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """``C(T(f))``."""
        translator, s_t, s_r = parts.require_translation()
        return parts.classifier(translator(features, s_t, s_r))


# --- configs -----------------------------------------------------------------------------------------
GENERATOR_ADAPT = AdaptConfig(max_iterations=60, min_iterations=30, batch_size=32, lr=2e-3)
"""G's training: at most 60 steps (at least 30) of batch 32 on the 64x64 crops, Adam 2e-3 - F's
forward and backward run every step, so this is what an image-space row costs (docs/baselines.md)."""

TRANSLATOR_ADAPT = AdaptConfig(max_iterations=200, min_iterations=50, batch_size=64, lr=1e-3)
"""T's adaptation stage (SFDA-IT, DSFDA): on cached features, as the model-based baselines."""


class SFDAITConfig(FrozenConfig):
    """SFDA-IT: G's training (``generator_adapt``, ``generator``, loss weights), then T's."""

    generator: GeneratorConfig = GeneratorConfig()
    generator_adapt: AdaptConfig = GENERATOR_ADAPT
    lambda_bn: float = Field(1.0, ge=0)
    lambda_kd: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    adapt: AdaptConfig = TRANSLATOR_ADAPT
    init: TranslatorInit = "identity"


class SFITConfig(FrozenConfig):
    """SFIT: the adapted target model (``shot``: the project's SHOT on T), then G's training."""

    shot: SHOTConfig = SHOTConfig()
    generator: GeneratorConfig = GeneratorConfig()
    generator_adapt: AdaptConfig = GENERATOR_ADAPT
    lambda_kd: float = Field(1.0, ge=0)
    lambda_rp: float = Field(1.0, ge=0)
    lambda_bn: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)


class DSFDAConfig(FrozenConfig):
    """DSFDA: G's training (class-conditioned), ``generated_per_frame`` generated crops per neutral
    frame, then T's supervised adaptation on neutral + generated features."""

    generator: GeneratorConfig = GeneratorConfig()
    generator_adapt: AdaptConfig = GENERATOR_ADAPT
    lambda_expr: float = Field(1.0, ge=0)
    lambda_id: float = Field(1.0, ge=0)
    lambda_rec: float = Field(1.0, ge=0)
    generated_per_frame: int = Field(1, ge=1)
    neutral_class: int = Field(0, ge=0)
    adapt: AdaptConfig = TRANSLATOR_ADAPT
    init: TranslatorInit = "identity"


def seeded_generator(config: GeneratorConfig, seed: int, num_classes: int = 0) -> ImageGenerator:
    """G initialised from ``seed`` alone (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageGenerator(config, num_classes)
