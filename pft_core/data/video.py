"""Video decoding with PyAV: probe, validate, sample frames, and isolate FFmpeg in a worker process.

Every way a file can be unusable ends in a typed :class:`~pft.core.errors.VideoError` that names
the file (docs/reliability.md case 12). Decoding runs in a persistent ``spawn`` worker process by default,
so a decoder crash (some FFmpeg builds segfault on truncated H.264) costs one file, not the caller.

This module must not import torch: the worker process imports it, and torch costs seconds.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig
from pft.core.errors import (
    DecodeTimeoutError,
    EmptyVideoFileError,
    FrameRateError,
    NoFramesError,
    NotAVideoError,
    ResolutionTooLargeError,
    TruncatedVideoError,
    VideoError,
)


class VideoConfig(FrozenConfig):
    """How videos are decoded and sampled, and the limits a file must respect.

    Attributes
    ----------
    sample_fps:
        Frames per second to keep; ``None`` keeps every frame.
    max_frames:
        At most this many frames are kept, spread evenly over the video.
    max_pixels:
        Largest accepted ``width * height`` (checked from the stream header before decoding).
    max_fps:
        Largest accepted frame rate; a rate above it (or not positive) is an error.
    isolate:
        Decode in a separate worker process so a crashing decoder cannot take the caller down.
    timeout_s:
        Longest time one file may take to decode in the worker before it is stopped.
    """

    sample_fps: float | None = Field(default=None, gt=0)
    max_frames: int = Field(default=300, ge=1)
    max_pixels: int = Field(default=4096 * 2160, ge=1)
    max_fps: float = Field(default=240.0, gt=0)
    isolate: bool = True
    timeout_s: float = Field(default=60.0, gt=0)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container header declares."""

    path: Path
    width: int
    height: int
    fps: float | None
    frames: int
    """Frame count declared by the container (0 when it does not say)."""
    codec: str
    duration_s: float | None


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of one video.

    Attributes
    ----------
    frames:
        uint8 RGB frames, shape ``(N, H, W, 3)``.
    frame_indices:
        int64 ``(N,)``: each kept frame's index in decode order (0-based).
    fps:
        The stream's frame rate.
    path:
        The decoded file.
    total_frames:
        How many frames the stream yielded in all.
    """

    frames: np.ndarray
    frame_indices: np.ndarray
    fps: float
    path: Path
    total_frames: int


# Container signatures: a file that starts like a video container but cannot be opened is
# truncated or corrupt; anything else is "not a video".
def _looks_like_video_container(head: bytes) -> bool:
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO BMFF (mp4, mov)
        or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska / WebM
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:4] == b"FLV\x01"
        or head[:3] == b"\x00\x00\x01"  # MPEG-PS / elementary stream
        or head[:1] == b"\x47"  # MPEG-TS sync byte
    )


def _open(path: Path) -> Any:
    import av

    if not path.is_file():
        raise NotAVideoError(path, "no such file")
    size = path.stat().st_size
    if size == 0:
        raise EmptyVideoFileError(path)
    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        with path.open("rb") as handle:
            head = handle.read(16)
        if _looks_like_video_container(head):
            raise TruncatedVideoError(path, f"FFmpeg cannot open it: {exc}") from None
        raise NotAVideoError(path, str(exc)) from None


def _info_from_container(path: Path, container: Any) -> VideoInfo:
    streams = container.streams.video
    if not streams:
        if not container.streams:
            raise NoFramesError(path, "the container holds no streams")
        raise NotAVideoError(path, "the file has no video stream")
    stream = streams[0]
    rate: Fraction | None = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    duration_s = None
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    return VideoInfo(
        path=path,
        width=int(stream.codec_context.width or 0),
        height=int(stream.codec_context.height or 0),
        fps=fps,
        frames=int(stream.frames or 0),
        codec=str(stream.codec_context.name),
        duration_s=duration_s,
    )


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's header (size, rate, declared frame count) without decoding frames.

    Raises
    ------
    EmptyVideoFileError, NotAVideoError, TruncatedVideoError, NoFramesError
        When the file cannot be opened as a video.
    """
    path = Path(path)
    container = _open(path)
    try:
        return _info_from_container(path, container)
    finally:
        container.close()


def check_video_info(info: VideoInfo, config: VideoConfig) -> None:
    """Refuse a video whose header breaks the configured limits (before any frame is decoded).

    Raises
    ------
    ResolutionTooLargeError, FrameRateError, NotAVideoError
    """
    if info.width <= 0 or info.height <= 0:
        raise NotAVideoError(info.path, f"the stream declares a size of {info.width}x{info.height}")
    if info.width * info.height > config.max_pixels:
        raise ResolutionTooLargeError(
            info.path,
            f"{info.width}x{info.height} = {info.width * info.height} pixels > max_pixels "
            f"{config.max_pixels}",
        )
    if info.fps is None or not np.isfinite(info.fps) or info.fps <= 0 or info.fps > config.max_fps:
        raise FrameRateError(info.path, f"{info.fps} fps (accepted: 0 < fps <= {config.max_fps})")


def planned_frame_indices(declared_frames: int, fps: float, config: VideoConfig) -> np.ndarray | None:
    """The frame indices to keep, given the declared frame count (``None`` when it is unknown).

    Frames are first thinned to ``sample_fps`` (a frame is kept when it starts a new
    ``1 / sample_fps`` time slot), then at most ``max_frames`` of them are kept, evenly spread.
    """
    if declared_frames <= 0:
        return None
    candidates = np.arange(declared_frames, dtype=np.int64)
    if config.sample_fps is not None and config.sample_fps < fps:
        slot = np.floor(candidates * config.sample_fps / fps).astype(np.int64)
        keep = np.ones_like(slot, dtype=bool)
        keep[1:] = slot[1:] != slot[:-1]
        candidates = candidates[keep]
    if len(candidates) > config.max_frames:
        pick = np.round(np.linspace(0, len(candidates) - 1, config.max_frames)).astype(np.int64)
        candidates = candidates[np.unique(pick)]
    return candidates


def decode_in_process(path: str | Path, config: VideoConfig) -> DecodedVideo:
    """Decode one video in the calling process (see :func:`decode_video` for the isolated path).

    The whole stream is decoded (H.264 frames depend on earlier ones, and a complete pass is
    how truncation is detected); only the planned frames are converted to RGB.

    Raises
    ------
    VideoError
        A typed subclass naming the file.
    """
    import av

    path = Path(path)
    container = _open(path)
    try:
        info = _info_from_container(path, container)
        check_video_info(info, config)
        assert info.fps is not None
        planned = planned_frame_indices(info.frames, info.fps, config)
        wanted = set(planned.tolist()) if planned is not None else None
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames: list[np.ndarray] = []
        indices: list[int] = []
        next_slot = 0  # used only when the declared count is unknown
        count = 0
        try:
            for frame in container.decode(stream):
                index = count
                count += 1
                if wanted is not None:
                    keep = index in wanted
                else:
                    slot = (
                        int(np.floor(index * config.sample_fps / info.fps))
                        if config.sample_fps is not None and config.sample_fps < info.fps
                        else index
                    )
                    keep = slot >= next_slot and len(frames) < config.max_frames
                    if keep:
                        next_slot = slot + 1
                if keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    indices.append(index)
        except (av.error.FFmpegError, ValueError, MemoryError) as exc:
            raise TruncatedVideoError(path, f"decoder failed after {count} frames: {exc}") from None
    finally:
        container.close()
    if count == 0:
        raise NoFramesError(path, f"the container declares {info.frames} frames, none decoded")
    if info.frames > 0 and count < info.frames:
        raise TruncatedVideoError(path, f"{count} frames decoded, the container declares {info.frames}")
    return DecodedVideo(
        frames=np.stack(frames).astype(np.uint8, copy=False),
        frame_indices=np.asarray(indices, dtype=np.int64),
        fps=info.fps,
        path=path,
        total_frames=count,
    )


# --- the worker process ------------------------------------------------------------------------
def _decode_job(path: str, config_json: str) -> tuple[str, Any]:
    """Worker entry point: decode, and return errors as data (exceptions do not pickle cleanly)."""
    config = VideoConfig.model_validate_json(config_json)
    try:
        return "ok", decode_in_process(path, config)
    except VideoError as exc:
        return "error", (type(exc).__name__, str(exc.path), exc.detail)


def _worker_ready(path: str) -> str:
    """Worker entry point for :meth:`VideoDecoder.start`: import PyAV now, not on the first file."""
    import av

    return str(av.__version__)


def worker_main_module_for_tests(path: str) -> str:
    """Test hook: the name of the module the worker runs as ``__main__``."""
    main = sys.modules["__main__"]
    return str(getattr(main, "__file__", None) or getattr(main.__spec__, "name", None) or "")


@contextlib.contextmanager
def _without_caller_main() -> Iterator[None]:
    """Start ``spawn`` children without re-running the caller's ``__main__`` module.

    A ``spawn`` child normally imports the parent's main module again (as ``__mp_main__``), so
    that functions defined there can be unpickled. The worker only runs module-level functions of
    this module, and the caller's main module can be heavy: the ``pft`` CLI, an app, or a
    benchmark import torch and take 2-4 s. While the child is started, ``__main__`` is a bare
    module, so the child imports only what its jobs need. The swap is process-wide: a thread
    reading ``sys.modules["__main__"]`` during that instant sees the bare module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def abort_worker_for_tests(path: str) -> None:
    """Test hook: kill the worker the hard way (as a segfaulting decoder would)."""
    os.abort()


def hang_worker_for_tests(path: str) -> None:
    """Test hook: a decoder that never returns."""
    import time

    time.sleep(3600)


def _raise_from_worker(payload: tuple[str, str, str]) -> None:
    from pft.core import errors

    name, path, detail = payload
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, VideoError)):
        cls = TruncatedVideoError
    raise cls(path, detail)


class VideoDecoder:
    """Decodes videos in one persistent ``spawn`` worker process (or in-process if not isolated).

    A worker that dies (segfault, abort, out of memory) turns into a :class:`TruncatedVideoError`
    for that file; a worker that runs past ``timeout_s`` is killed and gives a
    :class:`DecodeTimeoutError`. Either way the next file gets a fresh worker.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self) -> None:
        self._executor: cf.ProcessPoolExecutor | None = None
        self.restarts = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # - worker lifecycle -
    def _worker_pids(self) -> list[int]:
        if self._executor is None:
            return []
        processes: dict[int, Any] = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    def worker_pid(self) -> int | None:
        """The worker's process id (``None`` before the first isolated decode)."""
        pids = self._worker_pids()
        return pids[0] if pids else None

    def _worker_alive(self) -> bool:
        if self._executor is None:
            return False
        processes: dict[int, Any] = getattr(self._executor, "_processes", None) or {}
        return all(p.is_alive() for p in processes.values())

    def _ensure_worker(self) -> cf.ProcessPoolExecutor:
        if self._executor is not None and not self._worker_alive():
            self._discard()
        if self._executor is None:
            self._executor = cf.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    def _submit(self, job: Callable[..., Any], *args: str) -> cf.Future[Any]:
        executor = self._ensure_worker()
        # a spawn-context pool starts its process inside submit(): keep the caller's main out of it
        with _without_caller_main():
            return executor.submit(job, *args)

    def start(self) -> None:
        """Start the worker now, in the background, and return at once.

        The worker's start-up (a new interpreter importing PyAV and NumPy, about 0.3-0.5 s) then
        overlaps the caller's own work (e.g. loading and verifying a bundle) instead of delaying
        the first decode. Does nothing if a live worker exists.
        """
        if self._executor is not None and self._worker_alive():
            return
        self._submit(_worker_ready, "")

    def _discard(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        for pid in list(getattr(executor, "_processes", None) or {}):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        executor.shutdown(wait=True, cancel_futures=True)
        self.restarts += 1

    def close(self) -> None:
        """Stop the worker process."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # - decoding -
    def run_in_worker(
        self,
        job: Callable[..., Any],
        path: str | Path,
        *args: str,
        timeout_s: float = 60.0,
    ) -> Any:
        """Run ``job(path, *args)`` in the worker; a dead or hung worker becomes a typed error."""
        path = Path(path)
        future = self._submit(job, str(path), *args)
        try:
            return future.result(timeout=timeout_s)
        except cf.TimeoutError:
            self._discard()
            raise DecodeTimeoutError(path, f"stopped after {timeout_s:g} s") from None
        except cf.process.BrokenProcessPool:
            self._discard()
            raise TruncatedVideoError(path, "the decoder process crashed on this file") from None

    def decode(self, path: str | Path, config: VideoConfig) -> DecodedVideo:
        """Decode one video (see :func:`decode_in_process` for what is checked).

        Raises
        ------
        VideoError
            A typed subclass naming the file.
        """
        if not config.isolate:
            return decode_in_process(path, config)
        status, payload = self.run_in_worker(
            _decode_job, path, config.model_dump_json(), timeout_s=config.timeout_s
        )
        if status == "error":
            _raise_from_worker(payload)
        assert isinstance(payload, DecodedVideo)
        return payload


_shared_decoder: VideoDecoder | None = None


def _shared() -> VideoDecoder:
    global _shared_decoder
    if _shared_decoder is None:
        _shared_decoder = VideoDecoder()
        atexit.register(_shared_decoder.close)
    return _shared_decoder


def decode_video(path: str | Path, config: VideoConfig | None = None) -> DecodedVideo:
    """Decode and sample one video, isolated in a shared worker process when ``config.isolate``.

    Parameters
    ----------
    path:
        The video file.
    config:
        Sampling and limits; defaults to ``VideoConfig()``.

    Returns
    -------
    DecodedVideo
        RGB uint8 frames ``(N, H, W, 3)`` with their frame indices and the frame rate.

    Raises
    ------
    EmptyVideoFileError, NotAVideoError, TruncatedVideoError, NoFramesError,
    ResolutionTooLargeError, FrameRateError, DecodeTimeoutError
        Each names the file.
    """
    config = config or VideoConfig()
    if not config.isolate:
        return decode_in_process(path, config)
    return _shared().decode(path, config)
