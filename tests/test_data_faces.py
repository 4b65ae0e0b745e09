"""Face detection, cropping with eye alignment, landmarks and the geometry descriptor."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from data_media import ASTRONAUT_EYES, ASTRONAUT_FACE, write_sidecar
from skimage.data import astronaut, lfw_subset

from pft.core.data.faces import AnnotatedFaceDetector, FaceBox, HaarFaceDetector, crop_face
from pft.core.data.landmarks import (
    AnnotatedLandmarkDetector,
    DlibLandmarkDetector,
    eye_centres,
    geometry_descriptor,
)
from pft.core.errors import FaceAnnotationError


def _iou(a: FaceBox, b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a.x1, b[2]) - max(a.x0, b[0]))
    iy = max(0.0, min(a.y1, b[3]) - max(a.y0, b[1]))
    inter = ix * iy
    return inter / (a.width * a.height + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_haar_finds_the_astronaut_face_where_it_is() -> None:
    boxes = HaarFaceDetector().detect(astronaut())
    assert len(boxes) == 1
    assert _iou(boxes[0], ASTRONAUT_FACE) > 0.5
    for x, y in ASTRONAUT_EYES:
        assert boxes[0].x0 < x < boxes[0].x1 and boxes[0].y0 < y < boxes[0].y1


def test_haar_finds_no_face_in_noise() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    assert HaarFaceDetector().detect(noise) == []


def test_haar_separates_lfw_faces_from_non_faces() -> None:
    # lfw_subset: 100 real 25x25 face crops then 100 non-faces; upscale and pad so the cascade fits
    images = lfw_subset()
    detector = HaarFaceDetector(min_neighbors=3, min_size_frac=0.3)

    def found(img: np.ndarray) -> bool:
        rgb = np.repeat((cv2.resize(img, (100, 100)) * 255).astype(np.uint8)[..., None], 3, axis=2)
        return bool(detector.detect(cv2.copyMakeBorder(rgb, 20, 20, 20, 20, cv2.BORDER_REPLICATE)))

    faces = sum(found(img) for img in images[:100])
    non_faces = sum(found(img) for img in images[100:])
    assert faces >= 50 and non_faces <= 10, (faces, non_faces)


def test_crop_without_eyes_equals_slice_and_resize() -> None:
    rng = np.random.default_rng(1)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (7, 7), 3)
    box = FaceBox(40, 30, 104, 94)  # 64x64, margin 0 -> exactly that region
    crop = crop_face(frame, box, size=32, margin=0.0)
    reference = cv2.resize(frame[30:94, 40:104], (32, 32), interpolation=cv2.INTER_AREA)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    assert np.abs(crop.astype(int) - reference.astype(int)).max() <= 1


def test_crop_margin_widens_the_square() -> None:
    frame = np.zeros((200, 200, 3), np.uint8)
    frame[90:110, 90:110] = 255  # a 20x20 white square in the middle
    tight = crop_face(frame, FaceBox(90, 90, 110, 110), size=40, margin=0.0)
    wide = crop_face(frame, FaceBox(90, 90, 110, 110), size=40, margin=0.5)  # side 40 -> white is half
    assert tight[1:-1, 1:-1].min() == 255  # the box fills the crop (edges blend when upscaling)
    assert wide[11:29, 11:29].min() == 255  # the box is the middle half of the wider crop
    assert wide[:9].max() == 0 and wide[31:].max() == 0 and wide[:, :9].max() == 0


def test_crop_with_eyes_levels_them() -> None:
    frame = np.zeros((200, 200, 3), np.uint8)
    angle = math.radians(25)
    centre = np.array([100.0, 100.0])
    offset = 30 * np.array([math.cos(angle), math.sin(angle)])
    left, right = centre - offset, centre + offset
    for x, y in (left, right):
        cv2.circle(frame, (round(x), round(y)), 4, (255, 255, 255), -1)
    box = FaceBox(60, 60, 140, 140)
    eyes = ((float(left[0]), float(left[1])), (float(right[0]), float(right[1])))
    aligned = crop_face(frame, box, size=80, margin=0.0, eyes=eyes)[..., 0]
    unaligned = crop_face(frame, box, size=80, margin=0.0)[..., 0]

    def blob_rows(img: np.ndarray) -> tuple[float, float]:
        ys, xs = np.nonzero(img > 128)
        return float(ys[xs < 40].mean()), float(ys[xs >= 40].mean())

    a, b = blob_rows(aligned)
    assert abs(a - b) < 1.0  # level after alignment
    a, b = blob_rows(unaligned)
    assert abs(b - a) > 20  # and clearly not before


def test_annotated_detectors_read_the_sidecar(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    write_sidecar(video, [(10, 12, 50, 60), None], (64, 64))
    frame = np.zeros((64, 64, 3), np.uint8)
    boxes = AnnotatedFaceDetector().detect(frame, video=video, index=0)
    assert boxes == [FaceBox(10, 12, 50, 60, 1.0)]
    assert AnnotatedFaceDetector().detect(frame, video=video, index=1) == []
    assert AnnotatedFaceDetector().detect(frame, video=video, index=5) == []
    marks = AnnotatedLandmarkDetector().landmarks(frame, boxes[0], video=video, index=0)
    assert marks is not None and marks.shape == (68, 2)
    pose = AnnotatedLandmarkDetector().pose(frame, boxes[0], video=video, index=0)
    assert pose is not None and pose.tolist() == [0.0, 0.0, 0.0]


def test_missing_sidecar_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(FaceAnnotationError, match=r"lonely.mp4.*lonely.faces.json"):
        AnnotatedFaceDetector().detect(np.zeros((8, 8, 3), np.uint8), video=tmp_path / "lonely.mp4", index=0)


def _face_landmarks(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    marks = rng.normal(0, 20, (68, 2))
    marks[36:42] = rng.normal([-30, -10], 2, (6, 2))
    marks[42:48] = rng.normal([30, -10], 2, (6, 2))
    return marks


def test_eye_centres_use_the_ibug_eye_points() -> None:
    marks = np.zeros((68, 2))
    marks[36:42] = [10, 20]
    marks[42:48] = [50, 22]
    assert eye_centres(marks) == ((10.0, 20.0), (50.0, 22.0))


def test_geometry_descriptor_is_invariant_to_similarity_transforms() -> None:
    marks = _face_landmarks(0)
    angle = math.radians(17)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    moved = 2.7 * marks @ rotation.T + np.array([140.0, -35.0])
    a, b = geometry_descriptor(marks), geometry_descriptor(moved)
    assert a.shape == (136,)
    assert np.allclose(a, b, atol=1e-4)
    # a different face geometry gives a different descriptor
    assert np.abs(geometry_descriptor(_face_landmarks(1)) - a).max() > 0.1


def test_geometry_descriptor_appends_scaled_pose() -> None:
    d = geometry_descriptor(_face_landmarks(0), np.array([45.0, -9.0, 0.0]))
    assert d.shape == (139,)
    assert d[-3:].tolist() == pytest.approx([0.5, -0.1, 0.0])


def test_dlib_landmarks_on_the_astronaut() -> None:
    try:
        detector = DlibLandmarkDetector()
    except Exception as exc:  # the optional extra is not installed
        pytest.skip(f"landmarks extra unavailable: {exc}")
    image = astronaut()
    box = HaarFaceDetector().detect(image)[0]
    marks = detector.landmarks(image, box)
    assert marks is not None and marks.shape == (68, 2)
    (lx, ly), (rx, ry) = eye_centres(marks)
    (ex0, ey0), (ex1, ey1) = ASTRONAUT_EYES
    assert math.hypot(lx - ex0, ly - ey0) < 8 and math.hypot(rx - ex1, ry - ey1) < 8
