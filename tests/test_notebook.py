"""``examples/quickstart.ipynb`` runs top to bottom (nbclient, a real IPython kernel) on a tiny
cohort, and is kept in the repository with its outputs stripped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs() -> None:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PFT_QUICKSTART_SIZE", "tiny")
    monkeypatch.setenv("PFT_QUICKSTART_WORK", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the contact sheet and the per-subject plot
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 2 and "`pft`" in tables[0] and "`neutral_norm`" in tables[0]
    assert "| Simple baselines |" in tables[1] and "`my_neutral_bias`" in tables[1]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "enrolled on" in printed and "personalised" in printed
    assert (tmp_path / "run-mine" / "results.json").is_file()
