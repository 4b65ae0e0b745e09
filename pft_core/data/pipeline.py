"""From video files to face clips: decode -> detect -> (landmarks) -> align and crop.

:func:`process_videos` runs a batch where a bad file never stops the others: every input ends up
either as a :class:`FaceClip` or as a :class:`Rejection` naming the file and the reason, and
``processed + rejected == given`` (docs/reliability.md cases 12 and 13).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig
from pft.core.data.datasets import VideoRecord
from pft.core.data.faces import FaceBox, FaceDetector, crop_face
from pft.core.data.landmarks import N_LANDMARKS, LandmarkDetector, PoseEstimator, eye_centres
from pft.core.data.quality import FaceQualityConfig, FrameTally, frame_reason, temporal_outliers
from pft.core.data.video import VideoConfig, VideoDecoder, decode_video
from pft.core.errors import NoFaceError, PFTError, TooFewFaceFramesError


class FaceCropConfig(FrozenConfig):
    """How faces are cropped.

    Attributes
    ----------
    size:
        Side of the square crop in pixels.
    margin:
        Context around the face box on each side, as a fraction of the box side.
    align:
        Rotate each crop so the eyes are level (needs a landmark detector).
    min_face_frames:
        A video with fewer accepted face frames than this is rejected.
    min_face_share:
        A video whose accepted face frames are fewer than this share of its sampled frames is
        rejected (a face passing through a few frames of a street scene is no enrollment video).
    quality:
        The face-quality gate deciding which detected faces count (:mod:`pft.core.data.quality`).
    """

    size: int = Field(default=64, ge=8, le=1024)
    margin: float = Field(default=0.15, ge=0.0, le=2.0)
    align: bool = True
    min_face_frames: int = Field(default=1, ge=1)
    min_face_share: float = Field(default=0.5, ge=0.0, le=1.0)
    quality: FaceQualityConfig = FaceQualityConfig()


@dataclass(frozen=True)
class FaceClip:
    """The face crops of one video.

    Attributes
    ----------
    crops:
        uint8 ``(N, S, S, 3)`` RGB face crops.
    frame_indices:
        int64 ``(N,)`` decode-order index of each crop's frame.
    boxes:
        float32 ``(N, 5)``: ``x0, y0, x1, y1, score`` in frame pixels.
    landmarks:
        float32 ``(N, 68, 2)`` (NaN where a frame had none), or ``None`` without a landmark detector.
    poses:
        float32 ``(N, 3)`` yaw, pitch, roll in degrees (NaN where unknown), or ``None``.
    frame_labels:
        Per-crop class names from the record's per-frame annotation, or ``None``.
    record:
        The video this clip came from.
    fps:
        The video's frame rate.
    sampled_frames:
        How many frames were sampled (crops are the ones with an accepted face).
    tally:
        Frames sampled, accepted and rejected by reason (the quality gate's outcome).
    """

    crops: np.ndarray
    frame_indices: np.ndarray
    boxes: np.ndarray
    landmarks: np.ndarray | None
    poses: np.ndarray | None
    frame_labels: tuple[str | None, ...] | None
    record: VideoRecord
    fps: float
    sampled_frames: int
    tally: FrameTally | None = None

    def __len__(self) -> int:
        return len(self.crops)


def _best(boxes: list[FaceBox]) -> FaceBox:
    return max(boxes, key=lambda b: (b.score, b.width * b.height))


def extract_face_clip(
    record: VideoRecord,
    video_config: VideoConfig,
    crop_config: FaceCropConfig,
    detector: FaceDetector,
    landmarker: LandmarkDetector | None = None,
    decoder: VideoDecoder | None = None,
) -> FaceClip:
    """Decode one video and crop the most confident face of every sampled frame.

    Frames without an accepted face are skipped: the quality gate (``crop_config.quality``, see
    :mod:`pft.core.data.quality`) decides (a detector with ``ground_truth = True``, the
    renderer's sidecar, is not gated), and ``FaceClip.tally`` counts the rejected frames by
    reason. With a landmark detector each frame's 68 landmarks (and
    head pose, if it is also a :class:`PoseEstimator`) are kept, and crops are eye-aligned when
    ``crop_config.align``.

    Raises
    ------
    VideoError
        The file could not be decoded (typed subclass naming the file).
    NoFaceError
        No sampled frame has a face.
    TooFewFaceFramesError
        Fewer than ``crop_config.min_face_frames`` frames, or fewer than
        ``crop_config.min_face_share`` of the sampled frames, have an accepted face.

    Both errors carry the frame counts as ``.tally`` (a :class:`FrameTally`).
    """
    decoded = (
        decoder.decode(record.path, video_config) if decoder else decode_video(record.path, video_config)
    )
    quality = crop_config.quality
    gated = not getattr(detector, "ground_truth", False)  # the renderer's sidecar is not gated
    detector_threshold = getattr(detector, "min_confidence", None)
    nan_marks = np.full((N_LANDMARKS, 2), np.nan, dtype=np.float32)
    nan_pose = np.full(3, np.nan, dtype=np.float32)
    rejected: dict[str, int] = {}
    # Per frame: (box, crop, landmarks, pose) of its face when it passed the per-frame checks.
    passed: list[tuple[int, FaceBox, np.ndarray, np.ndarray, np.ndarray] | None] = []
    for frame, index in zip(decoded.frames, decoded.frame_indices.tolist(), strict=True):
        found = detector.detect(frame, video=record.path, index=index)
        if not found:
            rejected["no_face"] = rejected.get("no_face", 0) + 1
            passed.append(None)
            continue
        box = _best(found)
        eyes = None
        points: np.ndarray | None = None
        pose: np.ndarray | None = None
        if landmarker is not None:
            points = landmarker.landmarks(frame, box, video=record.path, index=index)
            if points is not None and points.shape != (N_LANDMARKS, 2):
                points = None
            if points is not None and crop_config.align:
                eyes = eye_centres(points)
            if isinstance(landmarker, PoseEstimator):
                pose = landmarker.pose(frame, box, video=record.path, index=index)
        crop = crop_face(frame, box, crop_config.size, crop_config.margin, eyes)
        reason = (
            frame_reason(
                box, frame.shape, quality, detector_threshold, landmarker is not None and points is None, crop
            )
            if gated
            else None
        )
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            passed.append(None)
            continue
        marks = nan_marks if points is None else points.astype(np.float32)
        passed.append((index, box, crop, marks, nan_pose if pose is None else pose.astype(np.float32)))
    outliers = temporal_outliers(
        [p[1] if p else None for p in passed], quality.min_neighbour_iou if gated else 0.0
    )
    kept = [p for p, outlier in zip(passed, outliers, strict=True) if p is not None and not outlier]
    if any(outliers):
        rejected["inconsistent"] = sum(outliers)
    sampled = len(decoded.frame_indices)
    tally = FrameTally(sampled=sampled, accepted=len(kept), rejected=rejected)
    if not kept:
        why = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        raise _with_tally(NoFaceError(record.path, f"0 of {sampled} sampled frames accepted: {why}"), tally)
    if len(kept) < crop_config.min_face_frames:
        raise _with_tally(
            TooFewFaceFramesError(
                record.path, f"{len(kept)} of {sampled} sampled frames, need {crop_config.min_face_frames}"
            ),
            tally,
        )
    if tally.share < crop_config.min_face_share:
        raise _with_tally(
            TooFewFaceFramesError(
                record.path,
                f"a face in only {len(kept)} of {sampled} sampled frames "
                f"({100 * tally.share:.0f} %, need {100 * crop_config.min_face_share:.0f} %)",
            ),
            tally,
        )
    indices = [p[0] for p in kept]
    crops = [p[2] for p in kept]
    boxes = [np.array([p[1].x0, p[1].y0, p[1].x1, p[1].y1, p[1].score], dtype=np.float32) for p in kept]
    marks_list = [p[3] for p in kept]
    poses = [p[4] for p in kept]
    frame_labels = None
    if record.frame_labels is not None:
        n = len(record.frame_labels)
        frame_labels = tuple(record.frame_labels[i] if i < n else None for i in indices)
    has_pose = isinstance(landmarker, PoseEstimator) and poses and not np.all(np.isnan(np.stack(poses)))
    return FaceClip(
        crops=np.stack(crops),
        frame_indices=np.asarray(indices, dtype=np.int64),
        boxes=np.stack(boxes),
        landmarks=np.stack(marks_list) if landmarker is not None else None,
        poses=np.stack(poses) if has_pose else None,
        frame_labels=frame_labels,
        record=record,
        fps=decoded.fps,
        sampled_frames=sampled,
        tally=tally,
    )


def _with_tally(error: PFTError, tally: FrameTally) -> PFTError:
    error.tally = tally  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True)
class Rejection:
    """A video that was not used: the file, the error's type name and the reason in words."""

    path: Path
    error: str
    reason: str
    tally: FrameTally | None = None
    """The quality gate's frame counts, when the video decoded (``None`` otherwise)."""


@dataclass
class BatchReport:
    """What a batch produced: ``processed + rejected == given`` always."""

    clips: list[FaceClip] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    given: int = 0

    @property
    def processed(self) -> int:
        """How many videos gave a face clip."""
        return len(self.clips)

    def reconciles(self) -> bool:
        """Whether every input is accounted for exactly once."""
        return self.processed + len(self.rejected) == self.given


ProgressCallback = Callable[[int, int, Path], None]
"""Called after each video with ``(done, total, path)``."""


def process_videos(
    records: Iterable[VideoRecord],
    video_config: VideoConfig | None = None,
    crop_config: FaceCropConfig | None = None,
    detector: FaceDetector | None = None,
    landmarker: LandmarkDetector | None = None,
    decoder: VideoDecoder | None = None,
    progress: ProgressCallback | None = None,
) -> BatchReport:
    """Run :func:`extract_face_clip` over many videos; a bad file is recorded, never fatal.

    Parameters
    ----------
    records:
        The videos.
    video_config, crop_config:
        Decoding and cropping settings (defaults when ``None``).
    detector:
        Face detector (default: :class:`~pft.core.data.faces.HaarFaceDetector`).
    landmarker:
        Optional landmark detector.
    decoder:
        A decoder to reuse; by default one worker process serves the whole batch.
    progress:
        Optional ``(done, total, path)`` callback.

    Returns
    -------
    BatchReport
        Clips in input order and one :class:`Rejection` per failed file.
    """
    from pft.core.data.faces import HaarFaceDetector

    records = list(records)
    video_config = video_config or VideoConfig()
    crop_config = crop_config or FaceCropConfig()
    detector = detector or HaarFaceDetector()
    report = BatchReport(given=len(records))
    own_decoder = decoder is None
    active = decoder or VideoDecoder()
    try:
        for done, record in enumerate(records, start=1):
            try:
                report.clips.append(
                    extract_face_clip(record, video_config, crop_config, detector, landmarker, active)
                )
            except PFTError as exc:
                report.rejected.append(
                    Rejection(record.path, type(exc).__name__, str(exc), getattr(exc, "tally", None))
                )
            except Exception as exc:  # a bug or an unforeseen file: still never stops the batch
                report.rejected.append(
                    Rejection(record.path, type(exc).__name__, f"{record.path}: unexpected error: {exc}")
                )
            if progress is not None:
                progress(done, len(records), record.path)
    finally:
        if own_decoder:
            active.close()
    return report
