"""`pft data check` and `pft data crops` on a tiny generic tree with a good and a bad file."""

from __future__ import annotations

from pathlib import Path

import cv2
from data_media import astronaut_pan, write_video
from typer.testing import CliRunner

from pft.cli.data import data_app


def _tree(root: Path) -> Path:
    frames, _ = astronaut_pan(n=4)
    write_video(root / "eileen" / "neutral" / "a.mp4", frames)
    (root / "eileen" / "happy").mkdir(parents=True)
    (root / "eileen" / "happy" / "broken.mp4").write_text("not a video")
    return root


def test_check_reports_counts_and_reasons(tmp_path: Path) -> None:
    result = CliRunner().invoke(data_app, ["check", str(_tree(tmp_path)), "--layout", "generic"])
    assert result.exit_code == 0, result.output
    assert "given 2  processed 1  rejected 1" in result.output
    assert "broken.mp4" in result.output and "NotAVideoError" in result.output


def test_check_wrong_layout_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(data_app, ["check", str(_tree(tmp_path)), "--layout", "biovid"])
    assert result.exit_code == 2 and "'video' folder" in result.output


def test_crops_writes_a_sheet(tmp_path: Path) -> None:
    out = tmp_path / "sheet.png"
    args = [
        "crops",
        str(_tree(tmp_path / "data")),
        "--layout",
        "generic",
        "--out",
        str(out),
        "--per-video",
        "4",
    ]
    result = CliRunner().invoke(data_app, args)
    assert result.exit_code == 0, result.output
    sheet = cv2.imread(str(out))
    assert sheet.shape == (64, 256, 3)
    assert sheet.std() > 10  # real crops, not an empty canvas
