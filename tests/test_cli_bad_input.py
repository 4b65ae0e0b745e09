"""Bad input on the command line (issue 19): refused before any work, one clear line, non-zero exit.

Each case used to print a raw traceback or to start work: a torn ``--config`` file, ``--cache-dir``
pointing at a file, ``pft data check --max-frames -1``, ``--num-cpus 1000``, ``--threads 100000``
and ``--device cuda:7`` on a machine without that GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pft.cli.main import app, run
from pft.core.errors import ResourceError
from pft.core.resources import check_torch_device, cpu_cores


def _refused(tmp_path: Path, args: list[str], needle: str) -> None:
    """Invoke ``pft ARGS`` and check: exit 2, one line naming ``needle``, nothing made."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists() and not (cache.exists() and any(cache.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no work started, nothing written


def _simulate(tmp_path: Path, *extra: str) -> list[str]:
    return ["simulate", "--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_a_torn_config_file(tmp_path: Path) -> None:
    torn = tmp_path / "torn.json"
    torn.write_text('{"profile": "biovid", "seed": ')
    _refused(tmp_path, _simulate(tmp_path, "--config", str(torn), "--cache-dir", str(tmp_path)), "--config")
    yaml_file = tmp_path / "torn.yaml"
    yaml_file.write_text("profile: [biovid\n")
    _refused(tmp_path, _simulate(tmp_path, "--config", str(yaml_file)), "not valid YAML")


def test_a_cache_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    _refused(tmp_path, _simulate(tmp_path, "--cache-dir", str(tmp_path / "afile")), "is a file")
    _refused(tmp_path, _simulate(tmp_path, "--cache-dir", str(tmp_path / "afile" / "below")), "is a file")
    args = ["ablate", "losses", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "afile")]
    _refused(tmp_path, args, "is a file")


def test_data_check_with_a_negative_frame_limit(tmp_path: Path) -> None:
    (tmp_path / "videos").mkdir()
    _refused(tmp_path, ["data", "check", str(tmp_path / "videos"), "--max-frames", "-1"], "max_frames")


def test_more_cpus_or_threads_than_this_machine_has(tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    flower = _simulate(tmp_path, "--engine", "flower", "--num-cpus", "1000", *cache)
    _refused(tmp_path, flower, "--num-cpus")
    _refused(tmp_path, _simulate(tmp_path, "--engine", "batched", "--threads", "100000", *cache), "--threads")
    assert cpu_cores() < 1000


def test_a_device_this_machine_does_not_have(tmp_path: Path) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cache = ["--cache-dir", str(tmp_path / "cache")]
    missing = f"cuda:{gpus + 7}"
    _refused(tmp_path, _simulate(tmp_path, "--engine", "batched", "--device", missing, *cache), "--device")
    _refused(tmp_path, _simulate(tmp_path, "--device", "gpu0", *cache), "not a torch device")
    assert check_torch_device("cpu").type == "cpu"
    with pytest.raises(ResourceError, match="no CUDA GPU" if gpus == 0 else "CUDA GPU"):
        check_torch_device(missing)


def test_the_entry_point_turns_a_typed_error_into_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typed error no command handles itself still ends as one line and exit 1 (never a traceback)."""
    with pytest.raises(SystemExit) as done:
        run(["client", "info", "--state", str(tmp_path / "none"), "--public-key", str(tmp_path / "k.pem")])
    assert done.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
