"""``pft data``: check a dataset folder through the video pipeline, and draw a sheet of face crops.

Registered by the main app as ``app.add_typer(data_app, name="data")``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pft.cli.failure import fail
from pft.core.data.datasets import LOADERS, DatasetIndex, load_dataset
from pft.core.data.faces import AnnotatedFaceDetector, FaceDetector, HaarFaceDetector
from pft.core.data.landmarks import AnnotatedLandmarkDetector, DlibLandmarkDetector, LandmarkDetector
from pft.core.data.pipeline import BatchReport, FaceCropConfig, process_videos
from pft.core.data.video import VideoConfig
from pft.core.errors import PFTError

data_app = typer.Typer(
    help="Check datasets through the video pipeline and look at face crops.", no_args_is_help=True
)
console = Console()


class DetectorChoice(StrEnum):
    """Which face detector to use."""

    auto = "auto"  # annotated sidecars for the synthetic cohort, Haar otherwise
    haar = "haar"
    annotated = "annotated"


class LandmarkChoice(StrEnum):
    """Which landmark detector to use."""

    auto = "auto"  # annotated for the synthetic cohort, none otherwise
    none = "none"
    annotated = "annotated"
    dlib = "dlib"


LayoutOption = Annotated[str, typer.Option("--layout", "-l", help=f"One of: {', '.join(sorted(LOADERS))}.")]
DetectorOption = Annotated[DetectorChoice, typer.Option(help="Face detector.")]
LandmarkOption = Annotated[LandmarkChoice, typer.Option(help="Landmark detector (for eye alignment).")]


def _detectors(
    layout: str, detector: DetectorChoice, landmarks: LandmarkChoice
) -> tuple[FaceDetector, LandmarkDetector | None]:
    synthetic = layout == "synthetic"
    use_annotated = detector == DetectorChoice.annotated or (detector == DetectorChoice.auto and synthetic)
    face: FaceDetector = AnnotatedFaceDetector() if use_annotated else HaarFaceDetector()
    marks: LandmarkDetector | None = None
    if landmarks == LandmarkChoice.annotated or (landmarks == LandmarkChoice.auto and synthetic):
        marks = AnnotatedLandmarkDetector()
    elif landmarks == LandmarkChoice.dlib:
        marks = DlibLandmarkDetector()
    return face, marks


def _run(
    root: Path,
    layout: str,
    limit: int | None,
    video_config: VideoConfig,
    crop_config: FaceCropConfig,
    detector: DetectorChoice,
    landmarks: LandmarkChoice,
) -> tuple[DatasetIndex, BatchReport]:
    index = load_dataset(root, layout)
    records = list(index.records[:limit] if limit else index.records)
    face, marks = _detectors(layout, detector, landmarks)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("videos", total=len(records))
        report = process_videos(
            records,
            video_config,
            crop_config,
            face,
            marks,
            progress=lambda done, _total, path: progress.update(task, completed=done, description=path.name),
        )
    return index, report


@data_app.command("check")
def check(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    layout: LayoutOption = "generic",
    limit: Annotated[int | None, typer.Option(help="Only the first N videos.")] = None,
    sample_fps: Annotated[
        float | None, typer.Option(help="Frames per second to keep (default: all).")
    ] = None,
    max_frames: Annotated[int, typer.Option(help="Most frames kept per video.")] = 300,
    detector: DetectorOption = DetectorChoice.auto,
    landmarks: LandmarkOption = LandmarkChoice.auto,
) -> None:
    """Scan a dataset, run every video through the pipeline, and report what was rejected and why."""
    try:
        video_config = VideoConfig(sample_fps=sample_fps, max_frames=max_frames)
    except ValidationError as exc:  # e.g. --max-frames -1: refused before any video is opened
        raise fail(exc, code=2) from None
    if limit is not None and limit < 1:
        raise fail(ValueError(f"--limit must be at least 1, got {limit}"), code=2)
    try:
        index, report = _run(root, layout, limit, video_config, FaceCropConfig(), detector, landmarks)
    except PFTError as exc:
        raise fail(exc, code=2) from None
    faces = sum(len(c) for c in report.clips)
    console.print(
        f"{index.layout}: {len(index.records)} videos, {len(index.subjects())} subjects, "
        f"classes {list(index.classes)}"
    )
    console.print(
        f"given {report.given}  processed {report.processed}  rejected {len(report.rejected)}  "
        f"face frames {faces}"
    )
    if report.rejected:
        console.print("rejected:")
        for rejection in report.rejected:
            console.print(f"  [yellow]{rejection.error}[/yellow] {rejection.reason}", soft_wrap=True)
    if not report.reconciles():  # pragma: no cover - an invariant of process_videos
        raise typer.Exit(3)


@data_app.command("crops")
def crops(
    root: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG file to write.")] = Path("crops.png"),
    layout: LayoutOption = "generic",
    videos: Annotated[int, typer.Option(help="How many videos (one row each).")] = 8,
    per_video: Annotated[int, typer.Option(help="Crops per row.")] = 8,
    size: Annotated[int, typer.Option(help="Crop side in pixels.")] = 64,
    detector: DetectorOption = DetectorChoice.auto,
    landmarks: LandmarkOption = LandmarkChoice.auto,
) -> None:
    """Write a sheet of face crops: one row per video, evenly spaced frames along it."""
    import cv2

    try:
        video_config = VideoConfig(max_frames=per_video)
        crop_config = FaceCropConfig(size=size)
        if videos < 1:
            raise ValueError(f"--videos must be at least 1, got {videos}")
    except (ValidationError, ValueError) as exc:
        raise fail(exc, code=2) from None
    try:
        _, report = _run(root, layout, videos, video_config, crop_config, detector, landmarks)
    except PFTError as exc:
        raise fail(exc, code=2) from None
    if not report.clips:
        console.print("[red]no face crops[/red]: every video was rejected")
        raise typer.Exit(1)
    rows = []
    for clip in report.clips:
        row = np.zeros((size, size * per_video, 3), np.uint8)
        for k, crop in enumerate(clip.crops[:per_video]):
            row[:, k * size : (k + 1) * size] = crop
        rows.append(row)
    sheet = np.concatenate(rows, axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover
        raise typer.Exit(1)
    from pft.core.atomic import atomic_write_bytes

    atomic_write_bytes(out, png.tobytes())
    console.print(f"wrote {out} ({len(rows)} videos; {len(report.rejected)} rejected)")
