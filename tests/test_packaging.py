"""The installed distribution: one import namespace (no top-level ``client``/``server``/
``simulations`` for an app's modules to clash with) and extras that match the users (the base is
the device: no Ray, no Flower simulation engine, no Opacus, matplotlib or scikit-learn)."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
from pathlib import Path

DIST = "sfda-pft"
#: what only the extras bring
NOT_IN_BASE = {
    "ray",
    "opacus",
    "matplotlib",
    "scikit-learn",
    "scipy",
    "scikit-image",
    "onnxruntime",
    "pyyaml",
}
_NAME = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _requirements() -> dict[str | None, set[str]]:
    """Requirement names per extra (``None`` = the base), lower-cased; an extra that pulls other
    extras of this distribution lists them as ``sfda-pft[x]``."""
    out: dict[str | None, set[str]] = {}
    for line in metadata.requires(DIST) or []:
        name = _NAME.match(line)
        assert name is not None, line
        extra = _EXTRA.search(line)
        entry = name.group(1).lower()
        if entry == DIST and name.group(2):
            out.setdefault(extra.group(1) if extra else None, set()).update(
                f"{DIST}[{e.strip()}]" for e in name.group(2).split(",")
            )
        else:
            out.setdefault(extra.group(1) if extra else None, set()).add(entry)
    return out


def test_base_install_is_the_device_sdk() -> None:
    requirements = _requirements()
    base = requirements[None]
    assert {"torch", "numpy", "cryptography", "safetensors", "av", "opencv-python-headless"} <= base
    assert base & NOT_IN_BASE == set()
    # Flower itself (the Flower App needs it), never with its Ray simulation engine
    flwr = [r for r in metadata.requires(DIST) or [] if r.startswith("flwr") and "extra ==" not in r]
    assert flwr and all("[" not in r for r in flwr)


def test_extras_match_the_users() -> None:
    requirements = _requirements()
    extras = set(metadata.metadata(DIST).get_all("Provides-Extra") or [])
    assert {"dp", "server", "sim", "all", "dev"} <= extras
    assert "opacus" in requirements["dp"] and "matplotlib" in requirements["server"]
    assert {"flwr", "scikit-learn", "matplotlib"} <= requirements["sim"]  # flwr[simulation]: Ray
    assert {f"{DIST}[{e}]" for e in ("dp", "server", "sim")} <= requirements["all"]
    assert f"{DIST}[all]" in requirements["dev"] and "pytest" in requirements["dev"]


def test_only_the_pft_namespace_is_importable(tmp_path: Path) -> None:
    """From a folder outside the repository: the folders' own names are not modules."""
    probe = (
        "import importlib, json\n"
        "found = {}\n"
        "for name in ('client', 'server', 'simulations', 'pft_core', 'pft_cli'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        found[name] = True\n"
        "    except ModuleNotFoundError:\n"
        "        found[name] = False\n"
        "from pft.client import Personalizer\n"
        "from pft.core.frames import FrameStore\n"
        "print(json.dumps(found))\n"
    )
    # what is installed, not what an earlier test put on PYTHONPATH (Flower's Ray backend sets
    # os.environ["PYTHONPATH"] to the driver's sys.path - the repository root under pytest - and keeps it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == (
        '{"client": false, "server": false, "simulations": false, "pft_core": false, "pft_cli": false}'
    )
