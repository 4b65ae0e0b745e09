"""Cohort config validation, profiles, the contact sheet and the `pft cohort` commands."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from pft.cli.cohort import cohort_app
from pft.core.cohort import PROFILES, CohortConfig, load_manifest, preview_cohort


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("profile", "nope"),
        ("source_subjects", 0),
        ("target_subjects", -1),
        ("frame_size", 47),
        ("frame_size", 300),
        ("frame_size", 97),
        ("seed", -3),
        ("workers", 0),
    ],
)
def test_a_bad_value_names_its_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CohortConfig(**{field: value})
    assert info.value.errors()[0]["loc"] == (field,)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="subjects"):
        CohortConfig(subjects=3)  # type: ignore[call-arg]


def test_profile_defaults_match_the_datasets() -> None:
    sizes = {
        name: (CohortConfig(profile=name).n_source, CohortConfig(profile=name).n_target) for name in PROFILES
    }
    assert sizes == {"biovid": (77, 10), "stressid": (44, 10), "bah": (214, 10), "affwild2": (282, 10)}
    for spec in PROFILES.values():
        assert spec.classes[0] == "neutral"
        assert set(spec.expressions) == set(spec.classes[1:])
    assert PROFILES["affwild2"].classes == (
        "neutral",
        "anger",
        "disgust",
        "fear",
        "happiness",
        "sadness",
        "surprise",
    )


def test_cli_make_info_preview(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "c"
    made = runner.invoke(
        cohort_app,
        [
            "make",
            "--profile",
            "stressid",
            "--out",
            str(out),
            "--source-subjects",
            "2",
            "--target-subjects",
            "1",
            "--light",
            "--workers",
            "1",
            "--seed",
            "3",
        ],
    )
    assert made.exit_code == 0, made.output
    assert "2 source + 1 target subjects" in made.output
    config = json.loads((out / "config.json").read_text())
    assert config["profile"] == "stressid" and config["light"] is True and config["seed"] == 3
    manifest = load_manifest(out)
    assert manifest.classes == ["neutral", "stress"] and manifest.seed == 3
    info = runner.invoke(cohort_app, ["info", str(out)])
    assert info.exit_code == 0 and "adapt" in info.output
    sheet = tmp_path / "sheet.png"
    shown = runner.invoke(cohort_app, ["preview", str(out), "--out", str(sheet), "--subjects", "3"])
    assert shown.exit_code == 0, shown.output
    image = mpimg.imread(sheet)
    assert image.shape[0] > 200 and image.shape[1] > 150 and image.std() > 0.05
    bad = runner.invoke(cohort_app, ["make", "--profile", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "profile" in bad.output
    assert not (tmp_path / "x").exists()


def test_preview_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    from pft.core.errors import DatasetLayoutError

    with pytest.raises(DatasetLayoutError):
        preview_cohort(tmp_path, tmp_path / "x.png")
