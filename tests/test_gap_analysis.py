"""The per-subject gap analysis: rows from results + manifest, Spearman correlations, the table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pft.core.cohort.manifest import CohortManifest, SubjectInfo
from pft.simulations.gap_analysis import correlations, markdown_correlations, plot_gaps, subject_gaps


def _manifest(leans: list[float], expressiveness: list[float]) -> CohortManifest:
    subjects = [
        SubjectInfo(
            id=f"T{k}",
            index=k,
            role="target",
            age_group="adult",
            expressiveness=e,
            resting_leans=lean > 0,
            resting_offset_strength=lean,
            resting_aus={},
            style={},
            traits={"glasses": False, "wrinkles": 0.1, "capture_noise": 2.0},
        )
        for k, (lean, e) in enumerate(zip(leans, expressiveness, strict=True))
    ]
    return CohortManifest(
        profile="biovid", seed=7, config={}, classes=["neutral", "pain"], frame_size=64, fps=8,
        frames_per_clip=8, subjects=subjects, videos=[],
    )


def _results(source: list[float], oracle: list[float]) -> dict:
    def per(values: list[float]) -> dict:
        return {"per_subject": {f"T{k}": {"f1": v} for k, v in enumerate(values)}}

    return {"seed": 7, "methods": {"source_only": per(source), "oracle": per(oracle)}}


def test_rows_and_hand_computed_rank_correlations(tmp_path: Path) -> None:
    # source-only F1 falls as the lean grows (rank correlation -1), the gap grows with it (+1)
    manifest = _manifest([0.0, 0.2, 0.5, 0.8], [0.9, 0.7, 1.0, 0.6])
    rows = subject_gaps(_results([90, 80, 60, 40], [92, 91, 90, 88]), manifest)
    assert [r.subject for r in rows] == ["T0", "T1", "T2", "T3"]
    assert [r.gap for r in rows] == [2, 11, 30, 48]
    corr = correlations(rows)
    assert corr["resting_lean"]["rho_source_f1"] == pytest.approx(-1.0)
    assert corr["resting_lean"]["rho_gap"] == pytest.approx(1.0)
    # expressiveness ranks 3, 2, 4, 1 against source F1 ranks 4, 3, 2, 1: rho = 1 - 6*sum(d^2)/(n(n^2-1))
    d2 = (3 - 4) ** 2 + (2 - 3) ** 2 + (4 - 2) ** 2 + (1 - 1) ** 2
    assert corr["expressiveness"]["rho_source_f1"] == pytest.approx(1 - 6 * d2 / (4 * 15))
    # constant factors have no correlation
    assert math.isnan(corr["glasses"]["rho_gap"]) and math.isnan(corr["capture_noise"]["rho_gap"])
    table = markdown_correlations(rows)
    assert "| `resting_lean` | -1.00" in table and "| `glasses` | - | - |" in table
    assert plot_gaps(rows, tmp_path / "g.png", "t").stat().st_size > 0


def test_no_rows_without_both_methods() -> None:
    results = _results([1, 2], [3, 4])
    del results["methods"]["oracle"]
    assert subject_gaps(results, _manifest([0, 0], [1, 1])) == []
