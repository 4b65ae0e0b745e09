"""Bundles through the SDK (docs/reliability.md cases 2 and 3): a tampered bundle, an added unsigned file,
an older version and a pickled weights file are refused, and the bundle the device had stays in
use. The signing primitives themselves are tested in tests/test_signing_*.py."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from sdk_support import SdkWorld, shared_world

from pft.client.sdk import ClientConfig, Personalizer
from pft.core.data import VideoConfig
from pft.core.errors import (
    BundleError,
    BundleRollbackError,
    BundleSignatureError,
    BundleTamperedError,
    BundleUnsignedFileError,
    UnsafeWeightsError,
)
from pft.core.signing import generate_signing_key, sign_bundle, write_manifest_files

CONFIG = ClientConfig(video=VideoConfig(isolate=False))


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


def _flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _probabilities(p: Personalizer, world: SdkWorld) -> np.ndarray:
    return p.predict(world.target_videos("eval")[0]).probabilities


def _installed(tmp_path: Path, world: SdkWorld) -> tuple[Path, Personalizer]:
    state = tmp_path / "state"
    p = Personalizer.from_bundle(world.bundle_v1, world.public_pem, state_dir=state, config=CONFIG)
    assert p.bundle.bundle_version == 1
    return state, p


def _mutations(world: SdkWorld, tmp_path: Path) -> dict[str, tuple[Path, type[BundleError]]]:
    flipped = world.copy_bundle(tmp_path / "flipped", 2)
    _flip(flipped / "F.safetensors")
    extra = world.copy_bundle(tmp_path / "extra", 2)
    (extra / "notes.txt").write_text("unsigned")
    manifest = world.copy_bundle(tmp_path / "manifest", 2)
    text = (manifest / "manifest.json").read_text().replace('"bundle_version": 2', '"bundle_version": 9')
    (manifest / "manifest.json").write_text(text)
    other = world.copy_bundle(tmp_path / "other", 2)
    sign_bundle(other, generate_signing_key())
    return {
        "flipped weights byte": (flipped, BundleTamperedError),
        "added unsigned file": (extra, BundleUnsignedFileError),
        "altered manifest": (manifest, BundleSignatureError),
        "another publisher's key": (other, BundleSignatureError),
    }


def _installed_folders(state: Path) -> list[str]:
    """What the device's bundle cache holds (the current bundle is derived from these folders)."""
    return sorted(e.name for e in (state / "bundles").iterdir())


def test_refused_bundles_leave_the_installed_one_in_use(world: SdkWorld, tmp_path: Path) -> None:
    state, p1 = _installed(tmp_path, world)
    want = _probabilities(p1, world)
    current = _installed_folders(state)
    for case, (folder, error) in _mutations(world, tmp_path).items():
        with pytest.raises(error):
            Personalizer.from_bundle(folder, world.public_pem, state_dir=state, config=CONFIG)
        assert _installed_folders(state) == current, case
        kept = Personalizer.from_installed(state, world.public_pem, config=CONFIG)
        assert kept.bundle_digest == p1.bundle_digest, case
        np.testing.assert_array_equal(_probabilities(kept, world), want)
    assert not [e for e in (state / "bundles").iterdir() if e.name.startswith(".incoming")]


def test_rollback_to_an_older_version_is_refused(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    p2 = Personalizer.from_bundle(world.bundle_v2, world.public_pem, state_dir=state, config=CONFIG)
    with pytest.raises(BundleRollbackError, match="older than the installed version 2"):
        Personalizer.from_bundle(world.bundle_v1, world.public_pem, state_dir=state, config=CONFIG)
    assert Personalizer.from_installed(state, world.public_pem).bundle_digest == p2.bundle_digest
    # without a state folder, min_version does the same check
    with pytest.raises(BundleRollbackError):
        Personalizer.from_bundle(world.bundle_v1, world.public_pem, min_version=2)
    # upgrading works and keeps the previous version on disk
    state2 = tmp_path / "state2"
    Personalizer.from_bundle(world.bundle_v1, world.public_pem, state_dir=state2)
    up = Personalizer.from_bundle(world.bundle_v2, world.public_pem, state_dir=state2)
    assert up.bundle.bundle_version == 2
    assert len([e for e in (state2 / "bundles").iterdir() if e.is_dir()]) == 2


def test_tampering_after_install_is_caught_on_load(world: SdkWorld, tmp_path: Path) -> None:
    state, _ = _installed(tmp_path, world)
    installed = next(e for e in (state / "bundles").iterdir() if e.is_dir())
    _flip(installed / "C.safetensors")
    with pytest.raises(BundleTamperedError, match=r"C\.safetensors"):
        Personalizer.from_installed(state, world.public_pem)


class _Marker:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (str(self.path), os.O_CREAT | os.O_WRONLY))


def test_a_signed_pickle_weights_file_is_refused_without_running_it(world: SdkWorld, tmp_path: Path) -> None:
    """Row 3: even a correctly signed bundle whose weights are a pickle is refused, and no code runs."""
    import torch

    marker = tmp_path / "pwned"
    state, p1 = _installed(tmp_path, world)
    current = _installed_folders(state)
    for name, payload in {
        "F.safetensors": lambda path: torch.save({"weight": _Marker(marker)}, path),
        "T.safetensors": lambda path: path.write_bytes(pickle.dumps(_Marker(marker))),
    }.items():
        victim = world.copy_bundle(tmp_path / f"pickled-{name}", 2)
        payload(victim / name)
        (victim / "manifest.sig").unlink()
        write_manifest_files(victim, {k: v for k, v in _manifest(victim).items() if k != "files"})
        sign_bundle(victim, world.key)  # the publisher signed it: the signature is valid
        with pytest.raises(UnsafeWeightsError, match=name.replace(".", r"\.")):
            Personalizer.from_bundle(victim, world.public_pem, state_dir=state)
        assert not marker.exists()
        # never installed: the device keeps its bundle
        assert _installed_folders(state) == current
        assert Personalizer.from_installed(state, world.public_pem).bundle_digest == p1.bundle_digest


def _manifest(folder: Path) -> dict[str, object]:
    import json

    data: dict[str, object] = json.loads((folder / "manifest.json").read_text())
    return data


def test_decoder_starts_with_the_bundle_and_a_refused_bundle_leaves_no_process(
    world: SdkWorld, tmp_path: Path
) -> None:
    import multiprocessing

    isolated = ClientConfig()  # video.isolate and prestart_decoder are on by default
    before = {p.pid for p in multiprocessing.active_children()}
    with Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=isolated) as p:
        assert p._decoder is not None and p._decoder.worker_pid() is not None  # before any video
    lazy = ClientConfig(prestart_decoder=False)
    with Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=lazy) as p:
        assert p._decoder is None
    extra = world.copy_bundle(tmp_path / "extra", 2)
    (extra / "notes.txt").write_text("unsigned")
    with pytest.raises(BundleUnsignedFileError):
        Personalizer.from_bundle(extra, world.public_pem, config=isolated)
    time.sleep(0.2)
    assert {p.pid for p in multiprocessing.active_children()} <= before
