"""The face-quality gate: which detected faces count as face frames, and why the others do not.

A sampled frame counts towards a video's face frames (and so towards enrollment's ``min_frames``)
only when its most confident face passes every check, tried in this order; the first that fails
is the frame's reason:

=================  ==========================================================================
``no_face``        the detector found nothing
``low_confidence`` the detector's score is below ``min_confidence`` (default: the detector's own)
``too_small``      the box side is under ``min_face_frac`` of the frame's shorter side or
                   under ``min_face_px`` pixels
``no_landmarks``   a landmark detector was given and found no landmarks in the box
``blurry``         the variance of the Laplacian of the grey crop is under ``min_sharpness``
``inconsistent``   (videos of 3 or more sampled frames) neither neighbouring sampled frame has
                   an accepted face overlapping this one by ``min_neighbour_iou`` (IoU): an
                   isolated detection is far more often a false positive than a face
=================  ==========================================================================

:class:`FrameTally` counts the outcome per video; ``sampled == accepted + sum(rejected)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig
from pft.core.data.faces import FaceBox

REASONS: tuple[str, ...] = (
    "no_face",
    "low_confidence",
    "too_small",
    "no_landmarks",
    "blurry",
    "inconsistent",
)


class FaceQualityConfig(FrozenConfig):
    """Thresholds of the face-quality gate (see the module docstring).

    Attributes
    ----------
    min_confidence:
        Lowest detector score accepted; ``None`` uses the detector's ``min_confidence``
        attribute (each detector's scores have their own scale), or accepts any score.
    min_face_frac, min_face_px:
        Smallest face box side, relative to the frame's shorter side and in pixels.
    require_landmarks:
        With a landmark detector, refuse faces it finds no landmarks in.
    min_sharpness:
        Lowest variance of the Laplacian of the grey face crop (at the crop size).
    min_neighbour_iou:
        Temporal consistency: the IoU an accepted neighbouring frame's face must reach
        (``0`` turns the check off).
    """

    min_confidence: float | None = None
    min_face_frac: float = Field(default=0.08, ge=0.0, le=1.0)
    min_face_px: float = Field(default=20.0, ge=0.0)
    require_landmarks: bool = True
    min_sharpness: float = Field(default=4.0, ge=0.0)
    min_neighbour_iou: float = Field(default=0.2, ge=0.0, le=1.0)


@dataclass(frozen=True)
class FrameTally:
    """Per video: frames sampled, frames whose face was accepted, and the rejected ones by reason."""

    sampled: int
    accepted: int
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def share(self) -> float:
        """Accepted face frames as a fraction of the sampled frames (0 with none sampled)."""
        return self.accepted / self.sampled if self.sampled else 0.0

    def reconciles(self) -> bool:
        """Whether every sampled frame is either accepted or rejected for one reason."""
        return self.accepted + sum(self.rejected.values()) == self.sampled

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: ``sampled``, ``accepted``, ``rejected`` (every reason, zeros included)."""
        return {
            "sampled": self.sampled,
            "accepted": self.accepted,
            "rejected": {r: int(self.rejected.get(r, 0)) for r in REASONS},
        }


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of a face crop's grey image (low = blurred or flat)."""
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY) if crop.ndim == 3 else crop
    return float(cv2.Laplacian(np.ascontiguousarray(grey, dtype=np.uint8), cv2.CV_64F).var())


def box_iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = a.width * a.height + b.width * b.height - inter
    return float(inter / union) if union > 0 else 0.0


def frame_reason(
    box: FaceBox,
    frame_shape: tuple[int, ...],
    config: FaceQualityConfig,
    min_confidence: float | None,
    landmarks_missing: bool,
    crop: np.ndarray,
) -> str | None:
    """The first per-frame check ``box`` fails (``None`` when it passes them all).

    ``min_confidence`` is the detector's own threshold, used when ``config.min_confidence`` is
    ``None``; ``landmarks_missing`` says a landmark detector was run and found none.
    """
    threshold = config.min_confidence if config.min_confidence is not None else min_confidence
    if threshold is not None and box.score < threshold:
        return "low_confidence"
    side = min(box.width, box.height)
    if side < config.min_face_px or side < config.min_face_frac * min(frame_shape[:2]):
        return "too_small"
    if landmarks_missing and config.require_landmarks:
        return "no_landmarks"
    if sharpness(crop) < config.min_sharpness:
        return "blurry"
    return None


def temporal_outliers(boxes: list[FaceBox | None], min_iou: float) -> list[bool]:
    """Which accepted boxes (``None`` = no accepted face) have no overlapping accepted neighbour.

    With fewer than 3 frames, or ``min_iou == 0``, nothing is an outlier.
    """
    n = len(boxes)
    out = [False] * n
    if n < 3 or min_iou <= 0:
        return out
    for i, box in enumerate(boxes):
        if box is None:
            continue
        neighbours = [boxes[j] for j in (i - 1, i + 1) if 0 <= j < n]
        out[i] = not any(b is not None and box_iou(box, b) >= min_iou for b in neighbours)
    return out
