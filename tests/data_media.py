"""Tiny real video files for the pipeline tests (written with PyAV), and the real astronaut face."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np

# Where the astronaut's face is in skimage.data.astronaut() (512x512), found by hand:
# eyes at about (202, 101) and (247, 103), mouth at about (225, 145), chin at about (225, 172),
# cheeks at about x = 177 and x = 272.
ASTRONAUT_FACE = (175, 60, 275, 180)  # x0, y0, x1, y1
ASTRONAUT_EYES = ((202.0, 101.0), (247.0, 103.0))


def write_video(
    path: Path,
    frames: Sequence[np.ndarray] | np.ndarray,
    fps: int = 10,
    codec: str = "libx264",
    faststart: bool = False,
) -> Path:
    """Encode RGB uint8 frames into a video file (H.264 mp4 by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w", options=options) as container:
        stream: Any = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def gradient_frames(n: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth frames whose brightness encodes the frame index (for decode checks)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 120, width, dtype=np.float32)[None, :, None]
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = np.clip(base + 10 * i + rng.integers(0, 3, (height, width, 3)), 0, 255)
    return frames


def astronaut_pan(n: int = 6, size: int = 320, step: int = 8) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Frames cut from the astronaut portrait, panning by ``step`` px per frame; and each offset."""
    from skimage.data import astronaut

    image = astronaut()
    frames, offsets = [], []
    for i in range(n):
        x, y = 40 + step * i, 10 + (step // 2) * i
        frames.append(image[y : y + size, x : x + size].copy())
        offsets.append((x, y))
    return np.stack(frames), offsets


def noise_frames(n: int = 4, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """Uniform noise frames: no face anywhere."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def write_sidecar(video: Path, boxes: Sequence[Sequence[float] | None], frame_size: tuple[int, int]) -> Path:
    """A renderer-style ``<stem>.faces.json`` with boxes, 68 landmarks and pose per frame."""
    frames: list[dict[str, Any]] = []
    for k, box in enumerate(boxes):
        if box is None:
            frames.append({"box": None, "landmarks": None, "pose": None})
            continue
        x0, y0, x1, y1 = box
        t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
        marks = np.stack(
            [(x0 + x1) / 2 + (x1 - x0) * 0.3 * np.cos(t), (y0 + y1) / 2 + (y1 - y0) * 0.3 * np.sin(t)], 1
        )
        marks[36:42] = [x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0)]
        marks[42:48] = [x0 + 0.7 * (x1 - x0), y0 + 0.4 * (y1 - y0)]
        frames.append({"box": list(box), "landmarks": marks.tolist(), "pose": [float(k), 0.0, 0.0]})
    path = video.with_name(video.stem + ".faces.json")
    path.write_text(json.dumps({"frame_size": list(frame_size), "frames": frames}))
    return path
