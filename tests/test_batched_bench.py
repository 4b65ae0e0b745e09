"""`pft bench` commands: the engines benchmark's JSON schema and the same work for every engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pft.cli.bench import bench_app
from pft.simulations.bench_engines import bench_engines
from pft.simulations.bench_latency import bench_adapt, bench_features


@pytest.mark.slow
def test_bench_engines_json(tmp_path: Path) -> None:
    out = tmp_path / "engines.json"
    result = CliRunner().invoke(
        bench_app,
        ["engines", "--subjects", "3", "--engines", "loop,batched", "--iterations", "3", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["subjects"] == 3 and data["matmul_gflops"] > 0
    assert {"cpu", "cores", "load_average"} <= set(data["machine"])
    flop = data["work"]["flop_per_subject"]
    assert flop == 3 * 64 * 6 * data["work"]["translator_params"]
    for engine in ("loop", "batched"):
        row = data["engines"][engine]
        assert row["iterations"] == 3 * 3  # the same fixed work, no early stop
        assert row["subjects_per_s"] == pytest.approx(3 / row["wall_s"], rel=1e-2)
        # gflops is rounded to 2 decimals: within 0.005 of the rate, whatever the load
        assert row["gflops"] == pytest.approx(3 * flop / row["wall_s"] / 1e9, rel=1e-2, abs=0.005)
        assert row["peak_rss_mb"] > 50  # a python + torch child, measured from /proc
    assert set(data["batched_vs"]) == {"loop"}


@pytest.mark.slow
def test_bench_engines_flower_runs_through_flwr_run_quietly(capfd: pytest.CaptureFixture[str]) -> None:
    """The Flower engine: `flwr run` with a SuperLink of its own (no deprecated `run_simulation`),
    the same fields and fixed work as the other engines, and none of Flower's noise on the terminal."""
    data = bench_engines(2, engines=("flower",), iterations=2, log=lambda _m: None)
    row = data["engines"]["flower"]
    assert "error" not in row, row
    assert row["iterations"] == 2 * 2
    assert row["wall_s"] > 0 and row["subjects_per_s"] == pytest.approx(2 / row["wall_s"], rel=1e-2)
    assert {"gflops", "peak_rss_mb", "peak_rss_mb_per_subject", "vmhwm_mb"} <= set(row)
    printed = "".join(capfd.readouterr())
    assert "DEPRECATED" not in printed and " DEBUG " not in printed, printed[-2000:]


def test_bench_engines_ray_address_refuses_only_the_loop() -> None:
    with pytest.raises(ValueError, match="batched,batched_fast,flower"):
        bench_engines(2, engines=("loop", "flower"), ray_address="127.0.0.1:1")


@pytest.mark.slow
def test_bench_adapt_and_features_numbers() -> None:
    adapt = bench_adapt(repeats=2, frames=24)
    assert len(adapt["runs_ms"]) == 2 and adapt["median_ms"] > 0
    assert all(1 <= n <= 60 for n in adapt["iterations"])
    features = bench_features(frames=32, batch_size=16, repeats=1)
    assert features["frames_per_s"] > 0 and features["frames"] == 32


def test_bench_engines_refuses_unknown_engine() -> None:
    result = CliRunner().invoke(bench_app, ["engines", "--subjects", "2", "--engines", "ray"])
    assert result.exit_code != 0


def test_engines_table_shows_rates_shares_and_ratios() -> None:
    from rich.console import Console

    from pft.cli.bench import engines_table

    row = {"subjects_per_s": 40.0, "gflops": 100.0, "peak_rss_mb": 700.4, "wall_s": 25.0}
    result = {
        "subjects": 1000,
        "matmul_gflops": 400.0,
        "engines": {
            "batched": row,
            "flower": {**row, "subjects_per_s": 5.0},
            "loop": {"error": "exit status 1"},
        },
    }
    console = Console(width=120, record=True)
    console.print(engines_table(result))
    text = console.export_text()
    assert "matmul 400.0 GFLOP/s" in text
    batched = next(line for line in text.splitlines() if "batched" in line)
    assert "40.00" in batched and "25%" in batched and "700" in batched and "8.0x" in batched
    assert "exit status 1" in text
