"""What a model was trained on, and how far a person's faces are from it.

Every bundle records its :class:`TrainingDomain` in ``config.json`` (``extra["domain"]``, covered
by the signed manifest): ``kind`` (``synthetic``: the renderer's cartoon faces; ``real``: a
dataset of real faces; ``unknown``: a bundle made before domains were recorded), a ``name``
(``synthetic:biovid``, ``generic:ward3``, ``FER-2013 ...``), the class names and the input spec.

:func:`domain_warning` is the sentence the SDK and the CLI show when a synthetic-domain model
meets a real video. :func:`ood_score` measures how far a person's neutral style code lies from
the source subjects' codes, in units of the source subjects' own spacing:

``ood = min_j ||s - s_j|| / median_j (min_{k != j} ||s_j - s_k||)``

(style codes z-scored by the bundle's normaliser). About 1 means "as close to a source subject as
source subjects are to each other"; well above :data:`OOD_WARN` (3) the person's faces look unlike
anything the model was trained on and its labels should not be trusted.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from pft.core.config import FrozenConfig
from pft.core.models import ModelConfig

OOD_WARN = 3.0


class TrainingDomain(FrozenConfig):
    """A bundle's training domain (see the module docstring)."""

    kind: Literal["synthetic", "real", "unknown"] = "unknown"
    name: str = "unknown"
    class_names: tuple[str, ...] = ()
    input: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def for_model(
        cls, kind: Literal["synthetic", "real"], name: str, class_names: Sequence[str], model: ModelConfig
    ) -> TrainingDomain:
        """The domain of a model trained on ``name``, with the input spec of ``model``."""
        channels = "grey (0.299 R + 0.587 G + 0.114 B)" if model.backbone == "fer" else "rgb"
        return cls(
            kind=kind,
            name=name,
            class_names=tuple(class_names),
            input={
                "image_size": model.image_size,
                "channels": channels,
                "range": [-1, 1],
                "backbone": model.backbone,
            },
        )

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> TrainingDomain:
        """The domain recorded in a bundle's ``extra`` (``unknown`` when there is none)."""
        value = extra.get("domain")
        return cls.model_validate(value) if isinstance(value, dict) else cls()

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict (for ``extra["domain"]``)."""
        return self.model_dump(mode="json")


def domain_warning(domain: TrainingDomain, real_video: bool) -> str | None:
    """The warning for a synthetic-domain model applied to a real video (``None`` otherwise)."""
    if domain.kind != "synthetic" or not real_video:
        return None
    return (
        f"this bundle's model was trained on synthetic faces ({domain.name}), not real ones: its labels "
        "for a real person are not meaningful; use a bundle trained on real faces "
        "(e.g. `pft bundle make --backbone fer`)"
    )


def ood_score(style: Tensor, source_codes: Sequence[Tensor]) -> float:
    """How far ``style`` (S,) lies from the source codes, in units of their own spacing (see above).

    Returns ``nan`` with fewer than two source codes.
    """
    if len(source_codes) < 2:
        return float("nan")
    codes = torch.stack([c.detach().double().flatten() for c in source_codes])
    s = style.detach().double().flatten()
    nearest = float(torch.cdist(s[None], codes).min())
    within = torch.cdist(codes, codes)
    within.fill_diagonal_(float("inf"))
    spacing = statistics.median(within.min(dim=1).values.tolist())
    return nearest / spacing if spacing > 0 else float("inf")
