"""The oracle: supervised fine-tuning on the target person's LABELLED frames (the upper bound).

The paper's "Oracle" row is supervised fine-tuning on the target subject's labelled data. Here it
fine-tunes F's last block(s) together with C, from the source model, with cross-entropy on the
person's labelled ``oracle`` clips (never their ``eval`` clips, never used by a source-free
method). The frozen blocks of F run once on the crops; the trainable tail runs in every step, on
the ONE shared :class:`~pft.core.adaptation.AdaptationTrainer`, so the oracle is seeded, logged and
converges like every other method. BatchNorm layers of the trainable tail are in train mode while
training, so their statistics move to the person's frames too.
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

TrainableTail = Literal["layer3", "layer4"]


class OracleConfig(FrozenConfig):
    """Supervised fine-tuning of F from block ``first_block`` on, and of C.

    ``adapt`` is the shared trainer's settings (steps, batch, optimiser, learning rate);
    ``batch_size`` is the crop batch used to run F's frozen blocks once.
    """

    first_block: TrainableTail = "layer4"
    adapt: AdaptConfig = AdaptConfig(max_iterations=200, min_iterations=200, lr=1e-3, weight_decay=1e-4)
    batch_size: int = Field(256, ge=1)


@dataclass(frozen=True)
class SupervisedFineTuning:
    """The oracle as an adaptation method: ``C(F_tail(h))`` on frozen-block maps ``h``, trained with
    cross-entropy on labelled target frames (the trainer's ``features`` are the maps ``h``)."""

    first_block: TrainableTail = "layer4"
    name: str = "oracle"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        """F's blocks from ``first_block`` on, and all of C."""
        if parts.extractor is None:
            raise ValueError("the oracle needs ModelParts.extractor (F)")
        return parts.extractor.block_parameters(self.first_block) + list(parts.classifier.parameters())

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy on the labelled batch."""
        if batch.labels is None:
            raise ValueError("the oracle needs labelled frames (AdaptationData.labels)")
        ce = classification_loss(self.predict(parts, batch.features), batch.labels)
        return ce, {"ce": float(ce.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        """Logits (N, K) of frozen-block maps (N, C, H, W)."""
        assert parts.extractor is not None
        return parts.classifier(parts.extractor.forward_from(features, self.first_block))


@torch.no_grad()
def frozen_maps(extractor: FeatureExtractor, crops: np.ndarray, first_block: str, batch_size: int) -> Tensor:
    """F's maps entering ``first_block`` (eval mode) for uint8 crops (N, S, S, 3)."""
    extractor.eval()
    last = LAYER_NAMES[LAYER_NAMES.index(first_block) - 1]
    x = preprocess(crops, extractor.config.image_size)
    steps = range(0, len(x), batch_size)
    return torch.cat([extractor.forward_to(x[k : k + batch_size], last) for k in steps])


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
    """Fine-tune COPIES of F's tail and C on a person's labelled crops; logits on ``eval_crops``.

    ``extractor`` and ``classifier`` are left untouched. Raises ``ValueError`` when the labelled
    crops and labels differ in number or fewer than two labelled crops are given.
    """
    if len(labelled_crops) != len(labels) or len(labels) < 2:
        raise ValueError(f"the oracle needs >= 2 labelled crops with one label each, got "
                         f"{len(labelled_crops)} crops and {len(labels)} labels")
    f_copy, c_copy = copy.deepcopy(extractor), copy.deepcopy(classifier)
    maps = frozen_maps(f_copy, labelled_crops, config.first_block, config.batch_size)
    data = AdaptationData(features=maps, labels=labels.long(), video_ids=video_ids)
    parts = ModelParts(classifier=c_copy, extractor=f_copy)
    method = SupervisedFineTuning(config.first_block)
    result = AdaptationTrainer(config.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    eval_maps = frozen_maps(f_copy, eval_crops, config.first_block, config.batch_size)
    with torch.no_grad():
        f_copy.eval()
        c_copy.eval()
        logits = method.predict(parts, eval_maps)
    n_params = sum(p.numel() for p in method.trainable_parameters(parts))
    return OracleResult(logits, result, n_params)
