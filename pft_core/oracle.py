"""The oracle: supervised fine-tuning on the target person's LABELLED frames (the upper bound).

The paper's "Oracle" row is supervised fine-tuning on the target subject's labelled data. Here it
fine-tunes, from the source model, C alone (``first_block="classifier"``) or F's last block(s)
together with C (``"layer4"``, ``"layer3"``), with cross-entropy on the person's labelled
``oracle`` clips - never their ``eval`` clips, and never used by a source-free method. The frozen
part of F runs on the crops (once, or on every step's augmented batch with ``augment``); the
trainable tail runs in every step, on the ONE shared :class:`~pft.core.adaptation.AdaptationTrainer`,
so the oracle is seeded, logged and converges like every other method. BatchNorm layers of a
trainable block are in train mode while training, so their statistics move to the person's frames.

Which tail to train is chosen on the validation cohort seeds like any default (docs/results.md).

Method ``oracle_bias`` (:func:`pft.core.methods.run_oracle_bias`, on
:class:`pft.core.adaptation.TranslatorSupervision` with ``bias_only``) is a second upper bound,
of stage 3 itself: T's output bias - the 128 numbers the shipped bias-only stage 3 adapts - fitted with the
person's labels of EVERY class. A neutral-only objective is not expected to place that bias
better than the labels do, so ``oracle - oracle_bias`` estimates what a bias-only translator cannot
reach with any objective, and ``oracle_bias - pft`` what its neutral-only objective leaves behind.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from pft.core.adaptation import AdaptationData, AdaptationTrainer, AdaptConfig, AdaptResult, Batch, ModelParts
from pft.core.config import FrozenConfig
from pft.core.losses import classification_loss
from pft.core.models import LAYER_NAMES, Classifier, FeatureExtractor, preprocess
from pft.core.training import SourceTrainConfig, augment

TrainableTail = Literal["classifier", "layer3", "layer4"]


class OracleConfig(FrozenConfig):
    """Supervised fine-tuning of C, or of F from block ``first_block`` on and of C.

    ``adapt`` is the shared trainer's settings (steps, batch, optimiser, learning rate);
    ``augment`` applies stage 1's photometric and geometric augmentation (``augmentation``) to
    every batch, which runs F's frozen part on every step; ``batch_size`` is the crop batch used
    to run F's frozen part once when there is no augmentation.
    """

    first_block: TrainableTail = "classifier"
    adapt: AdaptConfig = AdaptConfig(max_iterations=300, min_iterations=300, lr=3e-3)
    augment: bool = False
    augmentation: SourceTrainConfig = SourceTrainConfig()
    batch_size: int = Field(256, ge=1)


@dataclass(frozen=True)
class SupervisedFineTuning:
    """The oracle as an adaptation method: ``C(F_tail(h))`` trained with cross-entropy on labelled
    target frames. The trainer's ``features`` are the frozen part's outputs ``h`` (maps entering
    ``first_block``, or pooled features for ``"classifier"``), or - with ``augmentation`` - the
    preprocessed crops themselves, augmented and run through the frozen part on every step."""

    first_block: TrainableTail = "classifier"
    augmentation: SourceTrainConfig | None = None
    name: str = "oracle"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """C's parameters, and F's blocks from ``first_block`` on."""
        if self.first_block == "classifier":
            return list(parts.classifier.parameters())
        return _extractor(parts).block_parameters(self.first_block) + list(parts.classifier.parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the labelled batch."""
        if batch.labels is None:
            raise ValueError("the oracle needs labelled frames (AdaptationData.labels)")
        h = batch.features
        if self.augmentation is not None:
            h = augment(h, self.augmentation, batch.generator)
            h = frozen_part(_extractor(parts), h, self.first_block)
        ce = classification_loss(self.predict(parts, h), batch.labels)
        return ce, {"ce": float(ce.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """Logits (N, K) of frozen-part outputs (see the class docstring)."""
        if self.first_block == "classifier":
            return parts.classifier(features)
        return parts.classifier(_extractor(parts).forward_from(features, self.first_block))


def _extractor(parts: ModelParts) -> FeatureExtractor:
    if parts.extractor is None:
        raise ValueError("the oracle needs ModelParts.extractor (F)")
    return parts.extractor


@torch.no_grad()
def frozen_part(extractor: FeatureExtractor, x: Tensor, first_block: TrainableTail) -> Tensor:
    """F's frozen part on images ``x`` (N, 3, S, S) in [-1, 1], its BatchNorm layers in eval mode:
    pooled features for ``"classifier"``, else the maps entering ``first_block``."""
    frozen = [m for m in extractor.modules() if isinstance(m, nn.BatchNorm2d)]
    modes = [m.training for m in frozen]
    for m in frozen:
        m.eval()
    try:
        if first_block == "classifier":
            return extractor(x)
        return extractor.forward_to(x, LAYER_NAMES[LAYER_NAMES.index(first_block) - 1])
    finally:
        for m, mode in zip(frozen, modes, strict=True):
            m.train(mode)


def frozen_outputs(
    extractor: FeatureExtractor, crops: np.ndarray, first_block: TrainableTail, batch_size: int
) -> Tensor:
    """:func:`frozen_part` of uint8 crops (N, S, S, 3), in batches."""
    x = preprocess(crops, extractor.config.image_size)
    steps = range(0, len(x), batch_size)
    return torch.cat([frozen_part(extractor, x[k : k + batch_size], first_block) for k in steps])


@dataclass
class OracleResult:
    """The oracle's logits on the evaluation crops and its training run."""

    logits: Tensor
    result: AdaptResult
    trainable_parameters: int


def fine_tune_oracle(
    extractor: FeatureExtractor,
    classifier: Classifier,
    labelled_crops: np.ndarray,
    labels: Tensor,
    eval_crops: np.ndarray,
    config: OracleConfig,
    seed: int,
    video_ids: Tensor | None = None,
) -> OracleResult:
    """Fine-tune COPIES of C (and F's tail) on a person's labelled crops; logits on ``eval_crops``.

    ``extractor`` and ``classifier`` are left untouched. Raises ``ValueError`` when the labelled
    crops and labels differ in number or fewer than two labelled crops are given.
    """
    if len(labelled_crops) != len(labels) or len(labels) < 2:
        raise ValueError(
            f"the oracle needs >= 2 labelled crops with one label each, got "
            f"{len(labelled_crops)} crops and {len(labels)} labels"
        )
    f_copy, c_copy = copy.deepcopy(extractor).eval(), copy.deepcopy(classifier)
    if config.augment:
        inputs = preprocess(labelled_crops, f_copy.config.image_size)
    else:
        inputs = frozen_outputs(f_copy, labelled_crops, config.first_block, config.batch_size)
    data = AdaptationData(features=inputs, labels=labels.long(), video_ids=video_ids)
    # F is needed for a trainable tail, or to run its frozen part on every augmented batch
    needs_f = config.first_block != "classifier" or config.augment
    parts = ModelParts(classifier=c_copy, extractor=f_copy if needs_f else None)
    method = SupervisedFineTuning(config.first_block, config.augmentation if config.augment else None)
    result = AdaptationTrainer(config.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    eval_inputs = frozen_outputs(f_copy, eval_crops, config.first_block, config.batch_size)
    with torch.no_grad():
        f_copy.eval()
        c_copy.eval()
        logits = method.predict(parts, eval_inputs)
    n_params = sum(p.numel() for p in method.trainable_parameters(parts))
    return OracleResult(logits, result, n_params)
