"""What the batched engine takes and gives per subject."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pft.core.models import Translator
from pft.core.objective import ReferenceTargets
from pft.core.personalize import PersonalizeConfig, SourceModel, translation_goal


@dataclass
class SubjectTask:
    """One subject's adaptation input: its neutral features, style codes, targets and seed."""

    subject: str
    features: Tensor
    style_target: Tensor
    style_reference: Tensor
    targets: ReferenceTargets
    seed: int
    video_ids: Tensor | None = None
    time_index: Tensor | None = None
    reference_subject: str = ""


def subject_task(
    model: SourceModel,
    features: Tensor,
    frame_stats: Tensor,
    config: PersonalizeConfig,
    seed: int,
    *,
    subject: str = "",
    descriptor: np.ndarray | None = None,
    video_ids: Tensor | None = None,
    time_index: Tensor | None = None,
) -> SubjectTask:
    """What :func:`pft.core.personalize.personalize` computes before adapting (style code, the
    ``reference_k`` matched source subjects and their statistics), for seed ``seed``.

    Raises
    ------
    TooFewFacesError
        Fewer than ``config.min_frames`` frames.
    """
    goal = translation_goal(
        model, features, frame_stats, config.model_copy(update={"seed": seed}), descriptor
    )
    return SubjectTask(
        subject=subject,
        features=features,
        style_target=goal.style_target,
        style_reference=goal.style_reference,
        targets=goal.targets,
        seed=seed,
        video_ids=video_ids,
        time_index=time_index,
        reference_subject=goal.references[0],
    )


@dataclass
class SubjectAdaptation:
    """A subject's adapted trainable tensors of T (name -> tensor), steps, convergence, last loss."""

    subject: str
    position: int
    state: dict[str, Tensor]
    iterations: int
    converged: bool
    final_loss: float

    def translator(self, base: Translator) -> Translator:
        """A copy of ``base`` with this subject's adapted tensors, in eval mode."""
        personal = copy.deepcopy(base)
        own = dict(personal.named_parameters())
        with torch.no_grad():
            for name, value in self.state.items():
                own[name].copy_(value)
        return personal.eval()
