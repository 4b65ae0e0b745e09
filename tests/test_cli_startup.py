"""``pft --help`` and ``pft --version`` start without loading the packages behind the commands
(no torch, numpy, OpenCV, PyAV, Flower, cryptography or pydantic: the commands import them when
they run), and the names the help lists are the registries' names. The start-up time itself is
measured by hand (docs/benchmarks.md), not asserted here: it depends on the machine's load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pft.cli.choices import DEFAULT_METHOD_NAMES, LAYOUT_NAMES, METHOD_NAMES, PROFILE_NAMES

HEAVY = ("torch", "numpy", "cv2", "av", "flwr", "cryptography", "pydantic", "yaml", "safetensors")

_PROBE = """
import json, sys
from pft.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {heavy!r}))
print(json.dumps({{"code": code, "heavy": sorted({{m.split(".")[0] for m in heavy}})}}))
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["client", "--help"], ["simulate", "--help"]])
def test_startup_loads_none_of_the_heavy_packages(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=HEAVY), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    assert "Usage" in done.stdout or "pft 0." in done.stdout


def test_help_names_are_the_registries_names() -> None:
    """The help lists the built-in names (it says that registered ones are accepted too, and
    cannot read plug-ins without importing them); each registry starts with exactly those."""
    from pft.core.cohort.profiles import BUILTIN_PROFILES
    from pft.core.cohort.profiles import PROFILES as PROFILE_REGISTRY
    from pft.core.data.datasets import BUILTIN_LAYOUTS, LOADERS
    from pft.core.methods import BUILTIN_METHODS, METHODS
    from pft.simulations.experiment import DEFAULT_METHODS, PROFILES

    assert BUILTIN_METHODS == METHOD_NAMES == tuple(METHODS)[: len(METHOD_NAMES)]
    assert DEFAULT_METHODS == DEFAULT_METHOD_NAMES
    assert PROFILES == BUILTIN_PROFILES == PROFILE_NAMES == tuple(PROFILE_REGISTRY)[: len(PROFILE_NAMES)]
    assert BUILTIN_LAYOUTS == LAYOUT_NAMES == tuple(LOADERS)[: len(LAYOUT_NAMES)]


def test_a_command_without_its_extra_exits_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from pft.cli.extras import require_extra

    require_extra("simulate", "sim", "json", "torch")  # installed: nothing happens
    with pytest.raises(typer.Exit) as done:
        require_extra("simulate", "sim", "json", "no_such_module_here")
    assert done.value.exit_code == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: `pft simulate` needs the `sim` extra (no_such_module_here not installed): "
        "pip install 'sfda-pft[sim]'"
    )
