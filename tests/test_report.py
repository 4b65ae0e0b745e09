"""The results schema and the paper-style table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pft.core.results import markdown_table, plot_per_subject, summarise_method, write_results


def _results() -> dict:
    return {
        "profile": "biovid",
        "seed": 0,
        "classes": ["neutral", "pain"],
        "methods": {
            "oracle": summarise_method(
                {"S1": {"f1": 95.0, "accuracy": 95.0}, "S2": {"f1": 91.0, "accuracy": 90.0}}, 10, 0.1
            ),
            "pft": summarise_method(
                {"S1": {"f1": 80.0, "accuracy": 81.0}, "S2": {"f1": 60.0, "accuracy": 62.0}}, 20, 0.2
            ),
            "source_only": summarise_method(
                {"S1": {"f1": 70.0, "accuracy": 71.0}, "S2": {"f1": 66.0, "accuracy": 64.0}}, 0, 0.0
            ),
        },
    }


def test_summary_mean_and_population_std_by_hand() -> None:
    entry = summarise_method({"a": {"f1": 60.0}, "b": {"f1": 80.0}}, 12, 0.5)
    assert entry["mean_f1"] == 70.0
    assert entry["std_f1"] == 10.0  # population std of {60, 80}
    assert entry["adapt_iterations"] == 12 and entry["adapt_seconds"] == 0.5


def test_table_rows_in_paper_order_best_bold_oracle_never_bold() -> None:
    table = markdown_table(_results())
    lines = table.splitlines()
    assert lines[0] == "| Setting | Method | S1 | S2 | Average |"
    methods = [line.split("|")[2].strip() for line in lines[2:]]
    assert methods == ["`source_only`", "`pft`", "`oracle`"]
    assert "**80.00**" in lines[3]  # pft best on S1
    assert "**66.00**" in lines[2] and "**70.00**" in lines[3]  # source-only best on S2; average tie
    assert "**70.00**" not in lines[2].split("|")[3]  # 70 on S1 for source_only is not best
    assert "**" not in lines[4]  # the oracle is an upper bound, never bolded


def test_results_written_and_plotted(tmp_path: Path) -> None:
    results = _results()
    path = write_results(tmp_path, results)
    assert json.loads(path.read_text())["methods"]["pft"]["mean_f1"] == pytest.approx(70.0)
    png = plot_per_subject(results, tmp_path / "bars.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
