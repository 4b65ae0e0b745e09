"""The pipeline benchmark runs and counts what it processed."""

from __future__ import annotations

from pathlib import Path

from data_media import write_sidecar

from pft.simulations.bench_pipeline import bench_pipeline, make_astronaut_videos


def test_bench_counts_frames_for_both_modes(tmp_path: Path) -> None:
    paths = make_astronaut_videos(tmp_path, count=1, frames=3)
    result = bench_pipeline(paths, repeats=1)
    assert result["detector"] == "HaarFaceDetector"
    for mode in ("isolated", "in_process"):
        assert result[mode]["frames"] == 3 and result[mode]["rejected"] == 0
        assert result[mode]["fps_median"] > 0


def test_bench_uses_sidecars_when_every_video_has_one(tmp_path: Path) -> None:
    paths = make_astronaut_videos(tmp_path, count=1, frames=3)
    write_sidecar(paths[0], [(50, 40, 150, 160)] * 3, (240, 240))
    result = bench_pipeline(paths, repeats=1)
    assert (result["detector"], result["landmarker"]) == (
        "AnnotatedFaceDetector",
        "AnnotatedLandmarkDetector",
    )
    assert result["isolated"]["frames"] == 3
