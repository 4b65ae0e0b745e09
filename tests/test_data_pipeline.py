"""Face clips from real video files, and batches in which bad files never stop the good ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_media import (
    ASTRONAUT_FACE,
    astronaut_pan,
    gradient_frames,
    noise_frames,
    write_sidecar,
    write_video,
)
from pydantic import ValidationError

from pft.core.data.datasets import VideoRecord
from pft.core.data.faces import AnnotatedFaceDetector, HaarFaceDetector
from pft.core.data.landmarks import AnnotatedLandmarkDetector
from pft.core.data.pipeline import FaceCropConfig, extract_face_clip, process_videos
from pft.core.data.video import VideoConfig, VideoDecoder
from pft.core.errors import NoFaceError, TooFewFaceFramesError

INPROC = VideoConfig(isolate=False)
CROP = FaceCropConfig(size=48)


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames, _ = astronaut_pan()
    return write_video(tmp_path_factory.mktemp("astro") / "astronaut.mp4", frames, fps=10)


def test_astronaut_face_is_cropped_where_the_face_is(astronaut_video: Path) -> None:
    _, offsets = astronaut_pan()
    clip = extract_face_clip(
        VideoRecord(path=astronaut_video, subject="eileen"), INPROC, CROP, HaarFaceDetector()
    )
    assert clip.crops.shape == (6, 48, 48, 3) and clip.crops.dtype == np.uint8
    assert clip.frame_indices.tolist() == list(range(6))
    fx0, fy0, fx1, fy1 = ASTRONAUT_FACE
    for (x0, y0, x1, y1, _score), (ox, oy) in zip(clip.boxes, offsets, strict=True):
        # back in portrait coordinates, the box centre lies on the hand-marked face, and it moves
        # with the pan (so it is found per frame, not copied)
        cx, cy = (x0 + x1) / 2 + ox, (y0 + y1) / 2 + oy
        assert fx0 + 20 < cx < fx1 - 20 and fy0 + 20 < cy < fy1 - 20
        assert 0.6 * (fx1 - fx0) < x1 - x0 < 1.3 * (fx1 - fx0)
    assert clip.landmarks is None and clip.poses is None


def test_no_face_video_is_a_typed_error(tmp_path: Path) -> None:
    path = write_video(tmp_path / "noise.mp4", noise_frames(), fps=10)
    with pytest.raises(NoFaceError, match=r"noise.mp4.*0 of 4"):
        extract_face_clip(VideoRecord(path=path, subject="x"), INPROC, CROP, HaarFaceDetector())


def test_face_in_too_few_frames(tmp_path: Path) -> None:
    video = write_video(tmp_path / "few.mp4", gradient_frames(6, 64, 64), fps=10)
    write_sidecar(video, [(8, 8, 40, 40), None, None, None, None, None], (64, 64))
    record = VideoRecord(path=video, subject="x")
    any_share = CROP.model_copy(update={"min_face_share": 0.0})
    clip = extract_face_clip(record, INPROC, any_share, AnnotatedFaceDetector())
    assert clip.frame_indices.tolist() == [0] and clip.sampled_frames == 6
    assert clip.tally is not None and clip.tally.rejected == {"no_face": 5} and clip.tally.reconciles()
    with pytest.raises(TooFewFaceFramesError, match=r"few.mp4.*1 of 6.*need 3"):
        extract_face_clip(
            record, INPROC, FaceCropConfig(min_face_frames=3, min_face_share=0.0), AnnotatedFaceDetector()
        )
    # the default share: a face in 1 of 6 sampled frames (17 %) is not a usable video
    with pytest.raises(TooFewFaceFramesError, match=r"only 1 of 6 sampled frames \(17 %, need 50 %\)"):
        extract_face_clip(record, INPROC, CROP, AnnotatedFaceDetector())


def test_annotated_path_keeps_landmarks_poses_and_frame_labels(tmp_path: Path) -> None:
    video = write_video(tmp_path / "ann.mp4", gradient_frames(5, 64, 64), fps=10)
    write_sidecar(video, [(8, 8, 40, 40), (9, 8, 41, 40), None, (10, 8, 42, 40), (11, 8, 43, 40)], (64, 64))
    record = VideoRecord(path=video, subject="x", frame_labels=("neutral", "pain", "pain", None, "neutral"))
    clip = extract_face_clip(
        record,
        VideoConfig(isolate=False, max_frames=4),
        CROP,
        AnnotatedFaceDetector(),
        AnnotatedLandmarkDetector(),
    )
    # planned frames 0, 1, 3, 4 (4 evenly over 5); all have a face
    assert clip.frame_indices.tolist() == [0, 1, 3, 4]
    assert clip.boxes[:, 0].tolist() == [8, 9, 10, 11]
    assert clip.landmarks is not None and clip.landmarks.shape == (4, 68, 2)
    assert clip.poses is not None and clip.poses[:, 0].tolist() == [0, 1, 3, 4]
    assert clip.frame_labels == ("neutral", "pain", None, "neutral")


def test_batch_with_good_and_bad_files_reconciles(tmp_path: Path, astronaut_video: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video at all\n" * 10)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(astronaut_video.read_bytes()[: astronaut_video.stat().st_size // 2])
    noise = write_video(tmp_path / "noise.mp4", noise_frames(), fps=10)
    fast = write_video(tmp_path / "fast.mp4", gradient_frames(3), fps=1000, codec="mpeg4")
    paths = [astronaut_video, empty, text, cut, noise, fast, astronaut_video, tmp_path / "missing.mp4"]
    seen: list[tuple[int, int]] = []
    report = process_videos(
        [VideoRecord(path=p, subject="s") for p in paths],
        VideoConfig(),  # isolated decoding
        CROP,
        HaarFaceDetector(),
        progress=lambda done, total, _path: seen.append((done, total)),
    )
    assert report.given == 8 and report.processed == 2 and len(report.rejected) == 6
    assert report.reconciles()
    assert seen == [(i, 8) for i in range(1, 9)]
    reasons = {r.path.name: r.error for r in report.rejected}
    assert reasons == {
        "empty.mp4": "EmptyVideoFileError",
        "text.mp4": "NotAVideoError",
        "cut.mp4": "TruncatedVideoError",
        "noise.mp4": "NoFaceError",
        "fast.mp4": "FrameRateError",
        "missing.mp4": "NotAVideoError",
    }
    assert all(r.path.name in r.reason for r in report.rejected)


def test_batch_survives_a_decoder_crash(tmp_path: Path, astronaut_video: Path) -> None:
    """A worker that dies on one file costs that file only."""

    class CrashOnSecond(VideoDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def decode(self, path: str | Path, config: VideoConfig):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == 2:
                from pft.core.data.video import abort_worker_for_tests

                self.run_in_worker(abort_worker_for_tests, path)
            return super().decode(path, config)

    records = [VideoRecord(path=astronaut_video, subject=str(i)) for i in range(3)]
    with CrashOnSecond() as decoder:
        report = process_videos(records, VideoConfig(), CROP, HaarFaceDetector(), decoder=decoder)
    assert report.processed == 2 and [r.error for r in report.rejected] == ["TruncatedVideoError"]
    assert report.reconciles()


@pytest.mark.parametrize(("field", "value"), [("size", 0), ("margin", -0.1), ("min_face_frames", 0)])
def test_malformed_crop_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        FaceCropConfig.model_validate({field: value})
