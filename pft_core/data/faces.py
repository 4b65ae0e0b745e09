"""Face detection and cropping.

Two detectors fill one :class:`FaceDetector` protocol: :class:`HaarFaceDetector` (OpenCV's bundled
frontal-face Haar cascade, offline, for real videos) and :class:`AnnotatedFaceDetector` (the
synthetic renderer's ground truth, read from the ``<stem>.faces.json`` sidecar beside each video),
so the synthetic cohort runs through exactly the same pipeline as real videos.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from pft.core.errors import FaceAnnotationError, PFTError

Point = tuple[float, float]


@dataclass(frozen=True)
class FaceBox:
    """An axis-aligned face box in pixel coordinates (``x1``/``y1`` exclusive) with a score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return self.y1 - self.y0

    @property
    def centre(self) -> Point:
        """Box centre ``(x, y)``."""
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def as_array(self) -> np.ndarray:
        """``[x0, y0, x1, y1]`` as float32."""
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.float32)


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces in one RGB uint8 frame; ``video``/``index`` identify the frame for annotations."""

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """Faces in the frame, most confident first (empty when there is none)."""
        ...


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade (``cv2.data.haarcascades``): offline, CPU, real faces.

    Parameters
    ----------
    scale_factor, min_neighbors:
        Passed to ``detectMultiScale``; higher ``min_neighbors`` means fewer false positives.
    min_size_frac:
        Smallest face side as a fraction of the frame's shorter side.
    cascade:
        Cascade file name inside ``cv2.data.haarcascades``.
    """

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size_frac: float = 0.08,
        cascade: str = "haarcascade_frontalface_default.xml",
    ) -> None:
        path = Path(cv2.data.haarcascades) / cascade  # type: ignore[attr-defined]
        self._classifier = cv2.CascadeClassifier(str(path))
        if self._classifier.empty():
            raise PFTError(
                f"OpenCV's Haar cascade {path} is missing; install opencv-python-headless 4.x "
                "(5.0 no longer ships the cascades)"
            )
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_frac = min_size_frac

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """Faces in an RGB (or grey) uint8 frame, highest cascade confidence first."""
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        grey = cv2.equalizeHist(np.ascontiguousarray(grey, dtype=np.uint8))
        side = max(8, int(min(grey.shape[:2]) * self.min_size_frac))
        rects, _levels, weights = self._classifier.detectMultiScale3(
            grey,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        boxes = [
            FaceBox(float(x), float(y), float(x + w), float(y + h), float(s))
            for (x, y, w, h), s in zip(rects, np.ravel(weights), strict=False)
        ]
        return sorted(boxes, key=lambda b: (b.score, b.width * b.height), reverse=True)


# --- the renderer's sidecar --------------------------------------------------------------------
def sidecar_path(video: Path) -> Path:
    """``<dir>/<stem>.faces.json`` for ``<dir>/<stem>.mp4``."""
    return video.with_name(video.stem + ".faces.json")


@lru_cache(maxsize=64)
def _load_sidecar_cached(path: str, mtime_ns: int) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise ValueError("expected an object with a 'frames' list")
    return data


def load_face_sidecar(video: str | Path) -> dict[str, Any]:
    """The parsed sidecar of ``video`` (cached while the file is unchanged).

    Raises
    ------
    FaceAnnotationError
        When the sidecar is missing or is not the expected JSON.
    """
    path = sidecar_path(Path(video))
    try:
        return _load_sidecar_cached(str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise FaceAnnotationError(video, f"{path.name} not found") from None
    except (ValueError, OSError) as exc:
        raise FaceAnnotationError(video, f"{path.name}: {exc}") from None


def sidecar_frame(video: Path | None, index: int | None) -> dict[str, Any] | None:
    """The sidecar entry of one frame, or ``None`` when the frame has no annotation."""
    if video is None or index is None:
        raise PFTError("annotated detectors need the frame's video path and index")
    frames = load_face_sidecar(video)["frames"]
    if not 0 <= index < len(frames):
        return None
    entry = frames[index]
    return entry if isinstance(entry, dict) else None


class AnnotatedFaceDetector:
    """Reads face boxes from the renderer's ``<stem>.faces.json`` sidecar (ground truth).

    ``ground_truth = True``: the face-quality gate (:mod:`pft.core.data.quality`) does not
    second-guess the renderer's boxes; only the per-video share of face frames applies.
    """

    ground_truth = True

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """The annotated box of frame ``index`` of ``video`` (empty if that frame has none)."""
        entry = sidecar_frame(video, index)
        box = entry.get("box") if entry else None
        if not box:
            return []
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise FaceAnnotationError(video or "?", f"frame {index}: bad box {box!r}") from None
        return [FaceBox(x0, y0, x1, y1, 1.0)]


# --- cropping ----------------------------------------------------------------------------------
def crop_face(
    frame: np.ndarray,
    box: FaceBox,
    size: int = 64,
    margin: float = 0.15,
    eyes: tuple[Point, Point] | None = None,
) -> np.ndarray:
    """A square face crop around ``box``, optionally rotated so the eyes are level.

    Parameters
    ----------
    frame:
        RGB uint8 image ``(H, W, 3)``.
    box:
        The face box; the crop is a square of side ``max(w, h) * (1 + 2 * margin)`` around its
        centre (parts outside the frame are filled by replicating the border).
    size:
        Output side in pixels.
    margin:
        Extra context on each side, as a fraction of the box side.
    eyes:
        ``(image-left eye, image-right eye)`` centres; when given the crop is rotated about the
        box centre by the angle of the line between them, so it comes out horizontal.

    Returns
    -------
    np.ndarray
        ``(size, size, 3)`` uint8.
    """
    cx, cy = box.centre
    side = max(box.width, box.height, 1.0) * (1.0 + 2.0 * margin)
    angle = 0.0
    if eyes is not None:
        (lx, ly), (rx, ry) = eyes
        angle = math.atan2(ry - ly, rx - lx)
    # Render at (about) the source resolution first, then area-average down: no aliasing.
    work = int(min(max(size, round(side)), 4 * size))
    scale = work / side
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    # Output pixel = R(-angle) * scale * (source - centre) + work / 2
    matrix = np.array(
        [
            [cos, sin, work / 2.0 - cos * cx - sin * cy],
            [-sin, cos, work / 2.0 + sin * cx - cos * cy],
        ],
        dtype=np.float64,
    )
    # OpenCV's pixel centres are at integer coordinates; boxes use pixel edges (x1 exclusive).
    matrix[:, 2] += matrix[:, :2].sum(axis=1) * 0.5 - 0.5
    patch = cv2.warpAffine(
        np.ascontiguousarray(frame),
        matrix,
        (work, work),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if work != size:
        patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(patch, dtype=np.uint8)
