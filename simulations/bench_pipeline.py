"""Benchmark of the video pipeline: decoded + face-cropped frames per second.

Measures isolated (worker process) and in-process decoding on the same files, median of a few
repeats. Run: ``python -m pft.simulations.bench_pipeline [VIDEO ...]`` (without videos it writes small
mp4s of a real face, skimage's astronaut portrait, panning) and it prints JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pft.core.data.datasets import VideoRecord
from pft.core.data.faces import AnnotatedFaceDetector, FaceDetector, HaarFaceDetector, sidecar_path
from pft.core.data.landmarks import AnnotatedLandmarkDetector, LandmarkDetector
from pft.core.data.pipeline import FaceCropConfig, process_videos
from pft.core.data.video import VideoConfig, VideoDecoder


def bench_pipeline(
    video_paths: Sequence[str | Path],
    repeats: int = 3,
    video_config: VideoConfig | None = None,
    crop_config: FaceCropConfig | None = None,
    detector: FaceDetector | None = None,
    landmarker: LandmarkDetector | None = None,
) -> dict[str, Any]:
    """Frames per second through decode -> detect -> crop, isolated and in-process.

    Parameters
    ----------
    video_paths:
        The videos (all processed once per repeat).
    repeats:
        Timed repeats per mode; the median is reported. One untimed warm-up pass runs first
        (worker start-up, file cache).
    video_config, crop_config:
        Pipeline settings (``isolate`` is overridden per mode).
    detector, landmarker:
        Default: the annotated sidecar detectors when every video has a sidecar, else Haar.

    Returns
    -------
    dict
        Per mode ``fps_median``, ``fps_all``, ``frames`` and ``seconds_median``, plus the inputs.
    """
    paths = [Path(p) for p in video_paths]
    video_config = video_config or VideoConfig()
    crop_config = crop_config or FaceCropConfig()
    annotated = all(sidecar_path(p).is_file() for p in paths)
    if detector is None:
        detector = AnnotatedFaceDetector() if annotated else HaarFaceDetector()
        if annotated and landmarker is None:
            landmarker = AnnotatedLandmarkDetector()
    records = [VideoRecord(path=p, subject=p.parent.name) for p in paths]
    result: dict[str, Any] = {
        "videos": len(paths),
        "repeats": repeats,
        "detector": type(detector).__name__,
        "landmarker": type(landmarker).__name__ if landmarker else None,
        "crop_size": crop_config.size,
    }
    for mode, isolate in (("isolated", True), ("in_process", False)):
        config = video_config.model_copy(update={"isolate": isolate})
        with VideoDecoder() as decoder:
            process_videos(records, config, crop_config, detector, landmarker, decoder=decoder)  # warm-up
            times, frames = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                report = process_videos(records, config, crop_config, detector, landmarker, decoder=decoder)
                times.append(time.perf_counter() - start)
                frames = sum(len(c) for c in report.clips)
        fps = [frames / t for t in times]
        result[mode] = {
            "frames": frames,
            "rejected": len(report.rejected),
            "seconds_median": round(statistics.median(times), 4),
            "fps_median": round(statistics.median(fps), 1),
            "fps_all": [round(f, 1) for f in fps],
        }
    return result


def make_astronaut_videos(folder: Path, count: int = 8, frames: int = 30, size: int = 240) -> list[Path]:
    """Small H.264 mp4s of the astronaut portrait panning (a real face), for the benchmark."""
    import av
    from skimage.data import astronaut

    image = astronaut()
    paths = []
    for k in range(count):
        path = folder / f"astronaut_{k}.mp4"
        with av.open(str(path), mode="w") as container:
            stream: Any = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
            for i in range(frames):
                x, y = 60 + (i + k) % 40, 20 + (i * 2 + k) % 30
                crop = np.ascontiguousarray(image[y : y + size, x : x + size])
                for packet in stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Benchmark the given videos (or generated astronaut clips) and print JSON."""
    from pft.core.machine import describe_machine

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(a) for a in args] or make_astronaut_videos(Path(tmp))
        result = bench_pipeline(paths)
    result["machine"] = describe_machine()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
