"""``pft data``: check a dataset folder through the video pipeline, and draw a sheet of face crops.

Registered by the main app as ``app.add_typer(data_app, name="data")``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pft.cli.choices import LAYOUT_NAMES
from pft.cli.failure import fail
from pft.core.errors import PFTError

if TYPE_CHECKING:  # imported in the commands: `pft --help` loads no OpenCV or numpy
    from pft.core.data.datasets import DatasetIndex
    from pft.core.data.faces import FaceDetector
    from pft.core.data.landmarks import LandmarkDetector
    from pft.core.data.pipeline import BatchReport, FaceCropConfig
    from pft.core.data.video import VideoConfig

data_app = typer.Typer(
    help="Check datasets through the video pipeline and look at face crops.", no_args_is_help=True
)
console = Console()


class DetectorChoice(StrEnum):
    """Which face detector to use."""

    auto = "auto"  # annotated sidecars for the synthetic cohort, else dlib HOG (or Haar without dlib)
    dlib_hog = "dlib-hog"
    dlib_cnn = "dlib-cnn"
    mtcnn = "mtcnn"
    haar = "haar"
    annotated = "annotated"


class LandmarkChoice(StrEnum):
    """Which landmark detector to use."""

    auto = "auto"  # annotated for the synthetic cohort, else the detector's own (dlib's 68 points)
    none = "none"
    annotated = "annotated"
    dlib = "dlib"


LayoutOption = Annotated[
    str,
    typer.Option(
        "--layout", "-l", help=f"One of: {', '.join(sorted(LAYOUT_NAMES))}, or a registered layout."
    ),
]
DetectorOption = Annotated[DetectorChoice, typer.Option(help="Face detector.")]
LandmarkOption = Annotated[LandmarkChoice, typer.Option(help="Landmark detector (for eye alignment).")]


def _detectors(
    layout: str, detector: DetectorChoice, landmarks: LandmarkChoice
) -> tuple[FaceDetector, LandmarkDetector | None]:
    from pft.core.data.detectors import make_detector
    from pft.core.data.landmarks import AnnotatedLandmarkDetector, DlibLandmarkDetector

    synthetic = layout == "synthetic"
    name = "annotated" if detector == DetectorChoice.auto and synthetic else detector.value
    face, own_marks = make_detector(name)
    marks: LandmarkDetector | None = own_marks if landmarks == LandmarkChoice.auto else None
    if landmarks == LandmarkChoice.annotated:
        marks = AnnotatedLandmarkDetector()
    elif landmarks == LandmarkChoice.dlib:
        marks = DlibLandmarkDetector()
    return face, marks


def video_rows(index: DatasetIndex, report: BatchReport) -> list[dict[str, object]]:
    """One JSON-ready row per video: frames decoded and accepted, rejected frames by reason, usable."""
    by_path = {r.path: r for r in index.records}
    rows: list[dict[str, object]] = []
    outcomes: list[tuple[Path, object, bool, str | None, str | None]] = [
        (c.record.path, c.tally, True, None, None) for c in report.clips
    ]
    outcomes += [(r.path, r.tally, False, r.error, r.reason) for r in report.rejected]
    for path, tally, usable, error, reason in outcomes:
        record = by_path.get(path)
        counts = tally.as_dict() if tally is not None else None  # type: ignore[attr-defined]
        rows.append(
            {
                "path": str(path),
                "subject": record.subject if record else None,
                "label": record.label if record else None,
                "split": record.split if record else None,
                "frames_decoded": counts["sampled"] if counts else 0,
                "frames_accepted": counts["accepted"] if counts else 0,
                "rejected_frames": counts["rejected"] if counts else {},
                "usable": usable,
                "error": error,
                "reason": reason,
            }
        )
    order = {r.path: k for k, r in enumerate(index.records)}
    rows.sort(key=lambda row: order.get(Path(str(row["path"])), len(order)))
    return rows


def _run(
    root: Path,
    layout: str,
    limit: int | None,
    video_config: VideoConfig,
    crop_config: FaceCropConfig,
    detector: DetectorChoice,
    landmarks: LandmarkChoice,
) -> tuple[DatasetIndex, BatchReport]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pft.core.data.datasets import load_dataset
    from pft.core.data.pipeline import process_videos

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
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: per video the frames decoded and accepted, the rejected "
            "frames by reason, and whether it is usable (and why not).",
        ),
    ] = False,
) -> None:
    """Scan a dataset, run every video through the pipeline, and report what was rejected and why."""
    from pydantic import ValidationError

    from pft.core.data.pipeline import FaceCropConfig
    from pft.core.data.video import VideoConfig

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
    if as_json:
        rows = video_rows(index, report)
        summary = {
            "layout": index.layout,
            "root": str(index.root),
            "videos": len(rows),
            "usable": sum(1 for r in rows if r["usable"]),
            "face_frames": sum(len(c) for c in report.clips),
        }
        typer.echo(json.dumps({**summary, "per_video": rows}, indent=2))
        return
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
    import numpy as np
    from pydantic import ValidationError

    from pft.core.atomic import atomic_write_bytes
    from pft.core.data.pipeline import FaceCropConfig
    from pft.core.data.video import VideoConfig

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
    atomic_write_bytes(out, png.tobytes())
    console.print(f"wrote {out} ({len(rows)} videos; {len(report.rejected)} rejected)")
