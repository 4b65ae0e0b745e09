"""Test-session setup shared by every test module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Flower's processes start each other by name (flower-superexec, flwr-clientapp, ...): make this
# environment's scripts come first on PATH, so the suite also works without an activated venv
# (CI runs `.venv/bin/python -m pytest`).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])
