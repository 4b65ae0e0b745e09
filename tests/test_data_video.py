"""Decoding, sampling, bad input (docs/reliability.md cases 12 and 15) and worker isolation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from data_media import gradient_frames, write_video
from pydantic import ValidationError

from pft.core.data.video import (
    VideoConfig,
    VideoDecoder,
    abort_worker_for_tests,
    decode_in_process,
    decode_video,
    hang_worker_for_tests,
    planned_frame_indices,
    probe_video,
)
from pft.core.errors import (
    DecodeTimeoutError,
    EmptyVideoFileError,
    FrameRateError,
    NoFramesError,
    NotAVideoError,
    ResolutionTooLargeError,
    TruncatedVideoError,
)

INPROC = VideoConfig(isolate=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("v") / "good.mp4", gradient_frames(20), fps=10)


def test_decode_every_frame_matches_what_was_written(good: Path) -> None:
    written = gradient_frames(20)
    decoded = decode_in_process(good, INPROC)
    assert decoded.frames.shape == (20, 48, 64, 3) and decoded.frames.dtype == np.uint8
    assert decoded.frame_indices.tolist() == list(range(20))
    assert decoded.fps == pytest.approx(10.0)
    # H.264 at crf 18 on smooth frames: close to the original, frame order preserved
    means = decoded.frames.reshape(20, -1).mean(axis=1)
    assert np.abs(means - written.reshape(20, -1).mean(axis=1)).max() < 3.0
    assert np.all(np.diff(means) > 5)


def test_probe_reads_the_header(good: Path) -> None:
    info = probe_video(good)
    assert (info.width, info.height, info.frames, info.codec) == (64, 48, 20, "h264")
    assert info.fps == pytest.approx(10.0)


def _plan(declared: int, fps: float, config: VideoConfig) -> np.ndarray:
    planned = planned_frame_indices(declared, fps, config)
    assert planned is not None
    return planned


def test_sampling_thins_to_sample_fps_then_caps_evenly() -> None:
    # 10 fps video sampled at 2.5 fps: every 4th frame
    assert _plan(20, 10.0, VideoConfig(sample_fps=2.5)).tolist() == [0, 4, 8, 12, 16]
    # cap to 3 frames, evenly spread over the whole video (first and last kept)
    assert _plan(20, 10.0, VideoConfig(max_frames=3)).tolist() == [0, 10, 19]
    # sample_fps above the stream rate keeps every frame
    assert _plan(5, 10.0, VideoConfig(sample_fps=30)).tolist() == [0, 1, 2, 3, 4]


def test_decode_with_sampling_returns_the_planned_frames(good: Path) -> None:
    full = decode_in_process(good, INPROC)
    sampled = decode_in_process(good, VideoConfig(isolate=False, sample_fps=2.5, max_frames=3))
    assert sampled.frame_indices.tolist() == [0, 8, 16]
    assert np.array_equal(sampled.frames, full.frames[[0, 8, 16]])


def test_isolated_decode_equals_in_process(good: Path) -> None:
    with VideoDecoder() as decoder:
        isolated = decoder.decode(good, VideoConfig())
    assert np.array_equal(isolated.frames, decode_in_process(good, INPROC).frames)


# --- bad input: each a typed error naming the file ---------------------------------------------
def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(EmptyVideoFileError, match=r"empty\.mp4"):
        decode_in_process(path, INPROC)


def test_text_file_named_mp4(tmp_path: Path) -> None:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    with pytest.raises(NotAVideoError, match=r"notes\.mp4"):
        decode_in_process(path, INPROC)


def test_truncated_mp4_with_index_at_the_end(tmp_path: Path, good: Path) -> None:
    # PyAV writes the moov index last: cut in half, the index is gone, the file still says mp4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TruncatedVideoError, match=r"cut\.mp4"):
        decode_in_process(cut, INPROC)


def test_truncated_mp4_with_index_first_decodes_fewer_frames_than_declared(tmp_path: Path) -> None:
    full = write_video(tmp_path / "fast.mp4", gradient_frames(30), faststart=True)
    cut = tmp_path / "fastcut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert probe_video(cut).frames == 30  # the header still declares all frames
    with pytest.raises(TruncatedVideoError, match=r"fastcut.mp4.*declares 30"):
        decode_in_process(cut, INPROC)


def test_zero_frames(tmp_path: Path) -> None:
    # AVI keeps a video stream header with no frames (an empty mp4 drops the track entirely)
    path = tmp_path / "zero.avi"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    assert len(av.open(str(path)).streams.video) == 1
    with pytest.raises(NoFramesError, match=r"zero\.avi"):
        decode_in_process(path, INPROC)


def test_empty_mp4_container_has_no_frames(tmp_path: Path) -> None:
    path = tmp_path / "hollow.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(NoFramesError, match=r"hollow\.mp4"):
        decode_in_process(path, INPROC)


def test_resolution_over_the_limit_is_refused_from_the_header(tmp_path: Path, good: Path) -> None:
    with pytest.raises(ResolutionTooLargeError, match=r"good.mp4.*64x48"):
        decode_in_process(good, VideoConfig(isolate=False, max_pixels=64 * 48 - 1))


@pytest.mark.slow
def test_8000x8000_video_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write_video(tmp_path / "huge.mp4", np.zeros((1, 8000, 8000, 3), np.uint8), codec="mpeg4")
    start = time.perf_counter()
    with pytest.raises(ResolutionTooLargeError, match=r"huge.mp4.*8000x8000"):
        decode_in_process(path, INPROC)
    assert time.perf_counter() - start < 0.5  # header only: decoding one 64 MP frame takes longer


def test_absurd_frame_rate(tmp_path: Path) -> None:
    path = write_video(tmp_path / "fast.mp4", gradient_frames(3), fps=1000, codec="mpeg4")
    with pytest.raises(FrameRateError, match=r"fast.mp4.*1000"):
        decode_in_process(path, INPROC)
    assert decode_in_process(path, VideoConfig(isolate=False, max_fps=2000)).fps == 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_frames", -1), ("max_frames", 0), ("sample_fps", 0.0), ("max_pixels", 0), ("timeout_s", -5)],
)
def test_malformed_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        VideoConfig.model_validate({field: value})


def test_unknown_config_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="max_frame"):
        VideoConfig(max_frame=3)  # type: ignore[call-arg]


# --- isolation ---------------------------------------------------------------------------------
def test_worker_crash_becomes_a_typed_error_and_the_next_file_decodes(good: Path) -> None:
    with VideoDecoder() as decoder:
        decoder.decode(good, VideoConfig())
        first = decoder.worker_pid()
        with pytest.raises(TruncatedVideoError, match=r"good.mp4.*crashed"):
            decoder.run_in_worker(abort_worker_for_tests, good)
        decoded = decoder.decode(good, VideoConfig())
        assert len(decoded.frames) == 20
        assert decoder.worker_pid() not in (None, first)


def test_worker_killed_while_idle_is_replaced(good: Path) -> None:
    with VideoDecoder() as decoder:
        decoder.decode(good, VideoConfig())
        pid = decoder.worker_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert len(decoder.decode(good, VideoConfig()).frames) == 20


def test_typed_errors_cross_the_process_boundary(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(EmptyVideoFileError) as caught:
        decode_video(path, VideoConfig())
    assert caught.value.path == path
    assert str(caught.value).count("0 bytes") == 1


def test_worker_module_does_not_import_torch() -> None:
    code = "import sys, pft.core.data.video, pft.core.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hung_worker_is_stopped_with_a_timeout_error(good: Path) -> None:
    with VideoDecoder() as decoder:
        start = time.perf_counter()
        with pytest.raises(DecodeTimeoutError, match=r"good.mp4.*1 s"):
            decoder.run_in_worker(hang_worker_for_tests, good, timeout_s=1.0)
        assert time.perf_counter() - start < 10
        assert len(decoder.decode(good, VideoConfig()).frames) == 20


def test_start_returns_at_once_with_a_live_worker(good: Path) -> None:
    with VideoDecoder() as decoder:
        assert decoder.worker_pid() is None
        decoder.start()
        pid = decoder.worker_pid()
        assert pid is not None
        decoder.start()  # idempotent while the worker lives
        assert decoder.worker_pid() == pid
        assert len(decoder.decode(good, VideoConfig()).frames) == 20
        assert decoder.worker_pid() == pid  # the decode used the pre-started worker


def test_worker_does_not_rerun_the_callers_main_module(tmp_path: Path) -> None:
    # A spawn child normally imports the parent's script again as __mp_main__ (for the pft CLI or
    # an app that means torch and seconds). The worker must start from a bare __main__.
    script = tmp_path / "app_main.py"
    marker = tmp_path / "imported_again"
    script.write_text(
        "import pathlib, sys\n"
        "if __name__ != '__main__':\n"
        f"    pathlib.Path({str(marker)!r}).write_text(__name__)\n"
        "from pft.core.data.video import VideoDecoder, worker_main_module_for_tests\n"
        "if __name__ == '__main__':\n"
        "    with VideoDecoder() as decoder:\n"
        "        print('main=' + decoder.run_in_worker(worker_main_module_for_tests, 'x'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    assert "main=\n" in done.stdout, done.stdout + done.stderr
    assert not marker.exists()
