"""Facial landmarks (68 points, iBUG order), head pose, and the identity-geometry descriptor.

Implementations of :class:`LandmarkDetector`: :class:`AnnotatedLandmarkDetector` (the renderer's
sidecar; also gives head pose) and :class:`DlibLandmarkDetector` (dlib's 68-point shape predictor,
``pip install 'sfda-pft[landmarks]'``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pft.core.data.faces import FaceBox, sidecar_frame
from pft.core.errors import FaceAnnotationError, PFTError

#: iBUG-68 index ranges of the two eyes: 36-41 is the subject's right eye (image left),
#: 42-47 the subject's left eye (image right).
IMAGE_LEFT_EYE = slice(36, 42)
IMAGE_RIGHT_EYE = slice(42, 48)
N_LANDMARKS = 68


@runtime_checkable
class LandmarkDetector(Protocol):
    """Locates facial landmarks inside a face box of one RGB uint8 frame."""

    def landmarks(
        self, frame: np.ndarray, box: FaceBox, *, video: Path | None = None, index: int | None = None
    ) -> np.ndarray | None:
        """``(K, 2)`` float32 ``(x, y)`` pixel positions, or ``None`` when none were found."""
        ...


@runtime_checkable
class PoseEstimator(Protocol):
    """Also gives the head pose of a face (yaw, pitch, roll)."""

    def pose(
        self, frame: np.ndarray, box: FaceBox, *, video: Path | None = None, index: int | None = None
    ) -> np.ndarray | None:
        """``(3,)`` float32 ``(yaw, pitch, roll)`` in degrees, or ``None``."""
        ...


def _points(value: Any, video: Path | None, index: int | None, field: str, shape: tuple[int, ...]) -> Any:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.all(np.isfinite(array)):
        raise FaceAnnotationError(video or "?", f"frame {index}: '{field}' is not a finite {shape} array")
    return array


class AnnotatedLandmarkDetector:
    """Landmarks and head pose from the renderer's ``<stem>.faces.json`` sidecar."""

    def landmarks(
        self, frame: np.ndarray, box: FaceBox, *, video: Path | None = None, index: int | None = None
    ) -> np.ndarray | None:
        """The frame's annotated 68 landmarks, or ``None`` when it has none."""
        entry = sidecar_frame(video, index)
        if not entry or entry.get("landmarks") is None:
            return None
        result: np.ndarray = _points(entry["landmarks"], video, index, "landmarks", (N_LANDMARKS, 2))
        return result

    def pose(
        self, frame: np.ndarray, box: FaceBox, *, video: Path | None = None, index: int | None = None
    ) -> np.ndarray | None:
        """The frame's annotated ``(yaw, pitch, roll)``, or ``None``."""
        entry = sidecar_frame(video, index)
        if not entry or entry.get("pose") is None:
            return None
        result: np.ndarray = _points(entry["pose"], video, index, "pose", (3,))
        return result


LANDMARKS_EXTRA_HINT = "pip install 'sfda-pft[landmarks]'  (dlib-bin and face-recognition-models)"


def face_models_dir() -> Path:
    """The ``models`` folder of the ``face-recognition-models`` package (dlib's model files).

    Raises
    ------
    PFTError
        The package is not installed (the message names the extra).
    """
    # face_recognition_models imports pkg_resources, which recent setuptools no longer ships:
    # locate its data without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PFTError(f"dlib's face models are not installed; {LANDMARKS_EXTRA_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _predictor_file() -> Path:
    path = face_models_dir() / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise PFTError(f"{path} is missing; reinstall with {LANDMARKS_EXTRA_HINT}")
    return path


class DlibLandmarkDetector:
    """dlib's 68-point shape predictor (the ``landmarks`` extra), run inside a given face box.

    Raises
    ------
    PFTError
        At construction, naming the extra to install, when dlib or the model is missing.
    """

    def __init__(self, model_path: str | Path | None = None) -> None:
        try:
            import dlib
        except ImportError:
            raise PFTError(f"dlib is not installed; {LANDMARKS_EXTRA_HINT}") from None
        self._dlib = dlib
        self._predictor = dlib.shape_predictor(str(model_path or _predictor_file()))

    def landmarks(
        self, frame: np.ndarray, box: FaceBox, *, video: Path | None = None, index: int | None = None
    ) -> np.ndarray | None:
        """68 landmarks inside ``box`` of an RGB uint8 frame."""
        rect = self._dlib.rectangle(int(box.x0), int(box.y0), int(box.x1), int(box.y1))
        shape = self._predictor(np.ascontiguousarray(frame, dtype=np.uint8), rect)
        if shape.num_parts != N_LANDMARKS:
            return None
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)


def eye_centres(landmarks: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(image-left eye centre, image-right eye centre)`` of 68 iBUG landmarks, for alignment."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (N_LANDMARKS, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {points.shape}")
    left = points[IMAGE_LEFT_EYE].mean(axis=0)
    right = points[IMAGE_RIGHT_EYE].mean(axis=0)
    return (float(left[0]), float(left[1])), (float(right[0]), float(right[1]))


def geometry_descriptor(
    landmarks: np.ndarray, pose: np.ndarray | None = None, pose_scale: float = 1.0 / 90.0
) -> np.ndarray:
    """Identity geometry of a face, for landmark-based pairing of source and target subjects.

    The 68 landmarks are normalised for where the face is, how big it is and how it is tilted,
    so what is left is the face's shape: (1) centre on the landmarks' mean; (2) divide by the
    inter-ocular distance (between the two eye centres); (3) rotate so the eye line is horizontal;
    (4) flatten to 136 values; (5) append the head pose ``(yaw, pitch, roll)`` in degrees times
    ``pose_scale`` (default 1/90, so +-90 degrees is about the size of a face in these units).
    A similarity transform of the landmarks (shift, scale, in-plane rotation) leaves the first
    136 values unchanged.

    Parameters
    ----------
    landmarks:
        ``(68, 2)`` iBUG landmarks in pixels.
    pose:
        Optional ``(3,)`` head pose in degrees.
    pose_scale:
        Weight of the pose values.

    Returns
    -------
    np.ndarray
        float32 ``(136,)``, or ``(139,)`` with the pose.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    (lx, ly), (rx, ry) = eye_centres(points)
    inter_ocular = float(np.hypot(rx - lx, ry - ly))
    if inter_ocular <= 1e-9:
        raise ValueError("the eye centres coincide; these landmarks cannot be normalised")
    angle = np.arctan2(ry - ly, rx - lx)
    cos, sin = np.cos(-angle), np.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    normalised = ((points - points.mean(axis=0)) / inter_ocular) @ rotation.T
    parts = [normalised.reshape(-1)]
    if pose is not None:
        parts.append(np.asarray(pose, dtype=np.float64).reshape(3) * pose_scale)
    return np.concatenate(parts).astype(np.float32)
