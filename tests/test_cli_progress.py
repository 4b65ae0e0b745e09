"""Progress off a terminal (a batch job's log, nohup, CI): one plain line per stage, not nothing."""

from __future__ import annotations

import pytest

from pft.cli.benchmark import overall_display
from pft.cli.progress import plain_lines, stage_bars


def test_stage_bars_print_one_line_per_stage_into_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    assert plain_lines()  # pytest's captured stderr is not a terminal
    with stage_bars(True) as bar:
        step = bar("stage 1: source model F, C", 12)
        for k in range(12):
            step(k + 1, 12)  # per-step updates stay silent in a log
        bar("stage 3: per-subject adaptation", 10)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("stage 1: source model F, C (12 steps)") and lines[0].startswith("[")
    assert lines[1].endswith("stage 3: per-subject adaptation (10 steps)")


def test_benchmark_display_names_runs_and_stages_into_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    with overall_display(True) as (stage, on_run):
        on_run(0, 2, "biovid seed 0")
        stage("cohort", 87)(1, 87)
        on_run(1, 2, "biovid seed 1")
    err = capsys.readouterr().err
    assert "benchmark: 0/2 runs done (biovid seed 0)" in err
    assert "cohort (87 steps)" in err and "benchmark: 1/2 runs done (biovid seed 1)" in err


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with stage_bars(False) as bar:
        bar("stage", 3)(1, 3)
    assert capsys.readouterr().err == ""
