"""The device path needs only the base install, and not even Flower: a whole SDK session (install
a bundle, predict, enroll from videos in the isolated decoder, save, load, export) runs in a fresh
interpreter in which Ray, Flower, Opacus, matplotlib, scikit-learn, SciPy, scikit-image,
onnxruntime and PyYAML cannot be imported (a ``sys.meta_path`` finder refuses them, in the
decoder's worker too), and none of them is loaded at the end. The same by hand in a fresh venv
with only the base install: docs/sdk.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sdk_support import SdkWorld, shared_world

#: what an app embedding the SDK never needs (the extras dp, server, sim; Flower, for the apps)
REFUSED = (
    "ray",
    "flwr",
    "opacus",
    "matplotlib",
    "sklearn",
    "scipy",
    "skimage",
    "onnxruntime",
    "yaml",
)

_SESSION = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys

    REFUSED = set(sys.argv[1].split(","))
    attempts = []

    # Importing a refused package fails as if it were not installed; a spec without an origin
    # answers mere find_spec probes (e.g. torch's list of third-party folders to skip).
    class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in REFUSED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            attempts.append(spec.name)
            raise ModuleNotFoundError(f"refused by the lean-install test: {spec.name}", name=spec.name)

        def exec_module(self, module):  # never reached
            raise ModuleNotFoundError(module.__name__)

    sys.meta_path.insert(0, Refuse())  # at import time: the spawned decoder worker gets it too

    if __name__ == "__main__":
        from pft.client import Personalizer, StoreKey

        bundle, pem, state, out = sys.argv[2:6]
        videos, probe = sys.argv[6:-1], sys.argv[-1]
        key = StoreKey.from_passphrase("a passphrase")
        with Personalizer.from_bundle(bundle, pem, state_dir=state, key=key, owner="alice") as p:
            before = p.predict(probe)
            report = p.enroll(videos)
            after = p.predict(probe)
            p.save()
        with Personalizer.load(state, pem, StoreKey.from_passphrase("a passphrase"), owner="alice") as q:
            again = q.predict(probe)
            q.export(out + "/model.onnx")
            q.export(out + "/model.pt", "torchscript")
        loaded = sorted({m.split(".")[0] for m in sys.modules} & REFUSED)
        print(json.dumps({
            "frames": report.frames_used,
            "personalized": [before.personalized, after.personalized, again.personalized],
            "same_after_load": after.probabilities.tolist() == again.probabilities.tolist(),
            "loaded": loaded,
            "attempts": sorted(set(attempts)),
        }))
    """
)


@pytest.mark.slow
def test_sdk_session_runs_without_the_extras(tmp_path_factory: pytest.TempPathFactory) -> None:
    world: SdkWorld = shared_world(tmp_path_factory)
    base = tmp_path_factory.mktemp("lean")
    script = base / "session.py"
    script.write_text(_SESSION)
    (base / "out").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            ",".join(REFUSED),
            str(world.bundle_v1),
            str(world.public_pem),
            str(base / "state"),
            str(base / "out"),
            *[str(v) for v in world.target_videos("adapt")],
            str(world.target_videos("eval")[0]),
        ],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["frames"] == 16
    assert result["personalized"] == [False, True, True] and result["same_after_load"]
    assert result["loaded"] == []
    assert (base / "out" / "model.onnx").stat().st_size > 0 and (base / "out" / "model.pt").is_file()


def test_the_refusing_finder_refuses(tmp_path: Path) -> None:
    """The check can fail: a script that imports a refused package dies with ModuleNotFoundError."""
    script = tmp_path / "probe.py"
    script.write_text(_SESSION.split('if __name__ == "__main__":')[0] + "\nimport yaml\n")
    done = subprocess.run(
        [sys.executable, str(script), ",".join(REFUSED)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "refused by the lean-install test: yaml" in done.stderr
