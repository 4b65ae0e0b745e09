"""The methods benchmark's measuring pieces: memory peaks and the summary/table of its rows."""

from __future__ import annotations

import sys

import pytest
import torch

from pft.simulations.bench_methods import _summarise, markdown, measure_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is sampled from /proc")
def test_measure_memory_sees_a_large_allocation_and_python_objects() -> None:
    with measure_memory() as peak:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        objects = [str(k) for k in range(20000)]
        del big
    assert peak.rss_growth >= 48 * 2**20
    assert peak.python_heap >= 20000 * 40 and len(objects) == 20000
    with measure_memory() as idle:
        pass
    assert idle.rss_growth < 16 * 2**20


def test_summary_and_table_of_two_subjects() -> None:
    rows = [
        {"subject": "a", "f1": 50.0, "accuracy": 60.0, "iterations": 10, "converged": True,
         "adapt_seconds": 0.1, "wall_seconds": 0.2, "trainable_parameters": 100,
         "peak_rss_growth_mb": 1.0, "peak_python_heap_mb": 0.5},
        {"subject": "b", "f1": 70.0, "accuracy": 80.0, "iterations": 30, "converged": False,
         "adapt_seconds": 0.3, "wall_seconds": 0.4, "trainable_parameters": 100,
         "peak_rss_growth_mb": 3.0, "peak_python_heap_mb": 0.25},
    ]  # fmt: skip
    s = _summarise(rows)
    assert s["mean_f1"] == 60.0 and s["iterations"] == 20.0 and s["converged_fraction"] == 0.5
    assert s["wall_seconds_per_subject"] == pytest.approx(0.3) and s["peak_rss_growth_mb"] == 3.0
    result = {
        "profile": "biovid", "seed": 0, "subjects": {"source": 4, "target": 2}, "seconds_total": 1.0,
        "machine": {"cpu": "x", "cores": 2, "torch": "2"}, "methods": {"shot": s},
    }  # fmt: skip
    table = markdown(result)
    assert "| `shot` | 60.00 | 70.00 | 20.0 | 0.50 | 0.300 | 100 | 3.0 | 0.50 |" in table
