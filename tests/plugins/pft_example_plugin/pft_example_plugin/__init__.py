"""An sfda-pft plug-in from outside the package: a method, a cohort profile and a dataset layout.

Installed, its entry points (pyproject.toml) make ``pft simulate --methods neutral_bias``,
``--profile biovid_subtle`` and ``--data ROOT --layout flat`` work; docs/extending.md walks
through each part.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from pft.core.adaptation import AdaptationData, AdaptationTrainer, AdaptConfig, Batch, ModelParts, predict
from pft.core.cohort import PROFILES, ProfileSpec
from pft.core.data import DatasetIndex, VideoRecord
from pft.core.errors import DatasetLayoutError
from pft.core.methods import MethodOutcome, MethodSettings, MethodSpec, TargetData
from pft.core.personalize import SourceModel


# --- a method: C's bias re-fitted so the person's neutral frames read as neutral ------------------
class NeutralBiasConfig(BaseModel):
    """Settings of ``neutral_bias`` (``settings: {neutral_bias: {...}}`` in a config file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    adapt: AdaptConfig = AdaptConfig(max_iterations=40, min_iterations=10, lr=0.05)
    smoothing: float = Field(0.4, ge=0.0, lt=1.0)  # probability mass left to the other classes


@dataclass(frozen=True)
class NeutralBias:
    """Trains only C's bias: cross-entropy of the neutral frames to a smoothed neutral target."""

    smoothing: float
    name: str = "neutral_bias"

    def trainable_parameters(self, parts: ModelParts) -> list[nn.Parameter]:
        return [parts.classifier.fc.bias]

    def loss(self, parts: ModelParts, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = parts.classifier(batch.features)
        k = logits.shape[1]
        target = torch.full_like(logits, self.smoothing / (k - 1))
        target[:, 0] = 1.0 - self.smoothing  # class 0 is neutral; every adapt frame is neutral
        loss = -(target * logits.log_softmax(1)).sum(1).mean()
        return loss, {"ce": float(loss.detach())}

    def predict(self, parts: ModelParts, features: Tensor) -> Tensor:
        return parts.classifier(features)


def run_neutral_bias(
    model: SourceModel, target: TargetData, settings: MethodSettings, seed: int
) -> MethodOutcome:
    config = settings.method_config("neutral_bias", NeutralBiasConfig)
    parts = ModelParts(classifier=copy.deepcopy(model.classifier))  # the source model stays as shipped
    method = NeutralBias(config.smoothing)
    neutral = target.adapt  # the person's NEUTRAL adapt frames, nothing else
    data = AdaptationData(neutral.features, video_ids=neutral.video_ids, time_index=neutral.time_index)
    result = AdaptationTrainer(config.adapt.model_copy(update={"seed": seed})).fit(method, parts, data)
    logits = predict(method, parts, target.eval.features)  # eval frames: prediction only
    n_params = sum(p.numel() for p in method.trainable_parameters(parts))
    return MethodOutcome(logits, result.iterations, result.seconds, None, result.converged, n_params)


NEUTRAL_BIAS = MethodSpec(run_neutral_bias, NeutralBiasConfig, group="Simple baselines")


# --- a cohort profile: BioVid with subtler, rarer pain and more resting-face leans ----------------
BIOVID_SUBTLE: ProfileSpec = PROFILES["biovid"].model_copy(
    update={
        "name": "biovid_subtle",
        "intensity": PROFILES["biovid"].intensity.model_copy(update={"lo": 0.3, "hi": 0.7}),
        "resting_lean_fraction": 0.6,
        "source_subjects": 20,
        "target_subjects": 4,
    }
)


# --- a dataset layout: every video in one folder, named <subject>__<class>__<anything>.<ext> -----
_FLAT_NAME = re.compile(r"^(?P<subject>[A-Za-z0-9-]+)__(?P<label>[a-z_]+)__.+$")
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")


def load_flat(root: Path, neutral_class: str = "neutral") -> DatasetIndex:
    """``<root>/<subject>__<class>__<anything>.mp4``; the neutral class comes first."""
    records = []
    for path in sorted(root.iterdir()):
        match = _FLAT_NAME.match(path.stem)
        if path.suffix.lower() in _VIDEO_SUFFIXES and match:
            records.append(VideoRecord(path=path, subject=match["subject"], label=match["label"]))
    if not records:
        raise DatasetLayoutError(f"flat: no <subject>__<class>__<name> videos in {root}")
    others = sorted({str(r.label) for r in records} - {neutral_class})
    return DatasetIndex(layout="flat", root=root, classes=(neutral_class, *others), records=tuple(records))
