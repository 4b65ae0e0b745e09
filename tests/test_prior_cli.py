"""`pft prior run`: options are validated before any cohort or federation work starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pft.cli.main import app


def test_bad_noise_list_is_refused_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    for noise in ("abc", "1,-2", ","):
        result = runner.invoke(app, ["prior", "run", "--out", str(tmp_path / "o"), "--noise", noise])
        assert result.exit_code == 2, result.output
        assert "--noise" in result.output
    assert not (tmp_path / "o").exists()


def test_too_few_participants_is_a_config_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prior", "run", "--out", str(tmp_path / "o"), "--participants", "1"])
    assert result.exit_code == 2
    assert "participants" in result.output
    assert not (tmp_path / "o").exists()
