"""The personal state through the SDK (docs/reliability.md rows 4 and 5): round trip, a corrupted or
foreign file, a wrong key, a state made for another bundle, and SIGKILL while saving. The store's
own format, key and crash tests are in tests/test_store_*.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from sdk_support import SdkWorld, shared_world

from pft.client.sdk import STATE_FILE, ClientConfig, Personalizer
from pft.client.store import StoreKey
from pft.core.adaptation import AdaptConfig
from pft.core.data import VideoConfig
from pft.core.errors import PersonalStateMismatchError, PFTError, StoreAuthenticationError, StoreError
from pft.core.personalize import PersonalizeConfig
from pft.core.privacy import DPRelease

FAST = ClientConfig(
    video=VideoConfig(isolate=False),
    personalize=PersonalizeConfig(adapt=AdaptConfig(max_iterations=8, min_iterations=4)),
)
RAW_KEY = StoreKey.from_bytes(bytes(range(32)))


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


def _crops(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _enrolled(world: SdkWorld, state: Path, owner: str = "alice", key: StoreKey = RAW_KEY) -> Personalizer:
    p = Personalizer.from_bundle(
        world.bundle_v1, world.public_pem, state_dir=state, config=FAST, key=key, owner=owner
    )
    p.enroll(world.target_videos("adapt"))
    return p


def _flip(path: Path, offset: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_and_load_give_the_same_personal_model(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = StoreKey.from_passphrase("correct horse battery staple")
    p = _enrolled(world, state, key=key)
    release = DPRelease(
        noise_multiplier=5.0,
        sample_rate=0.5,
        steps=10,
        delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        privacy_unit="video",
        records=6,
        epsilon=0.5,
    )
    p.ledger.record(release, "adaptation")
    recorded = p.privacy_ledger
    assert len(recorded) == 1
    path = p.save()
    assert path == state / STATE_FILE
    q = Personalizer.load(
        state, world.public_pem, StoreKey.from_passphrase("correct horse battery staple"), owner="alice"
    )
    assert q.enrolled and not q.recovered_from_backup
    np.testing.assert_array_equal(
        q.predict_crops(_crops()).probabilities, p.predict_crops(_crops()).probabilities
    )
    assert q.privacy_ledger == recorded
    assert q.personalization is not None and p.personalization is not None
    assert q.personalization.reference_subject == p.personalization.reference_subject
    assert q.info()["enrollment"]["frames_used"] == 16
    # the ciphertext does not contain the translator's weights in clear
    blob = path.read_bytes()
    weight = p.personalization.translator.out.weight.detach().numpy().tobytes()
    assert weight[:64] not in blob


def test_a_corrupted_state_falls_back_to_the_last_good_copy(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = _enrolled(world, state)
    p.save()
    want = p.predict_crops(_crops()).probabilities
    p.save()  # second generation: the first is now personal.store.prev
    _flip(state / STATE_FILE)
    q = Personalizer.load(state, world.public_pem, RAW_KEY, owner="alice")
    assert q.recovered_from_backup
    np.testing.assert_array_equal(q.predict_crops(_crops()).probabilities, want)
    _flip(state / f"{STATE_FILE}.prev")
    with pytest.raises(StoreAuthenticationError, match=r"personal\.store.*corrupted") as err:
        Personalizer.load(state, world.public_pem, RAW_KEY, owner="alice")
    assert "previous copy failed too" in str(err.value)


def test_a_state_moved_to_another_user_or_opened_with_the_wrong_key_fails(
    world: SdkWorld, tmp_path: Path
) -> None:
    alice = tmp_path / "alice"
    _enrolled(world, alice).save()
    bob = tmp_path / "bob"
    Personalizer.from_bundle(world.bundle_v1, world.public_pem, state_dir=bob)
    (bob / STATE_FILE).write_bytes((alice / STATE_FILE).read_bytes())
    with pytest.raises(StoreAuthenticationError, match="another owner"):
        Personalizer.load(bob, world.public_pem, RAW_KEY, owner="bob")
    with pytest.raises(StoreAuthenticationError, match="wrong passphrase or key"):
        Personalizer.load(alice, world.public_pem, StoreKey.from_bytes(b"\x01" * 32), owner="alice")
    # a wrong key never overwrites the user's state
    p = _enrolled(world, alice)
    with pytest.raises(StoreAuthenticationError, match="refusing to overwrite"):
        p.save(StoreKey.from_bytes(b"\x01" * 32), owner="alice")
    assert Personalizer.load(alice, world.public_pem, RAW_KEY, owner="alice").enrolled


def test_a_state_made_for_another_bundle_is_refused(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _enrolled(world, state).save()
    Personalizer.from_bundle(world.bundle_v2, world.public_pem, state_dir=state)  # app update
    with pytest.raises(
        PersonalStateMismatchError, match=r"version 1.*installed bundle.*version 2.*enroll again"
    ):
        Personalizer.load(state, world.public_pem, RAW_KEY, owner="alice")


def test_save_needs_a_state_dir_a_key_and_an_enrollment(world: SdkWorld) -> None:
    p = Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=FAST)
    with pytest.raises(StoreError, match="key and the owner"):
        p.save()
    with pytest.raises(PFTError, match="enroll the person first"):
        p.save(RAW_KEY, owner="alice")
    p.enroll(world.target_videos("adapt"))
    with pytest.raises(StoreError, match="no state_dir"):
        p.save(RAW_KEY, owner="alice")


_SAVER = textwrap.dedent(
    """
    import sys
    from pft.client.sdk import Personalizer
    from pft.client.store import StoreKey
    state, pem = sys.argv[1], sys.argv[2]
    p = Personalizer.load(state, pem, StoreKey.from_bytes(bytes(range(32))), owner="alice")
    p.save()
    print("ready", flush=True)
    while True:
        p.save()
    """
)


@pytest.mark.slow
def test_sigkill_while_saving_leaves_a_state_that_loads(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = _enrolled(world, state)
    p.save()
    want = p.predict_crops(_crops()).probabilities
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, str(script), str(state), str(world.public_pem)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        q = Personalizer.load(state, world.public_pem, RAW_KEY, owner="alice")
        assert not q.recovered_from_backup  # the current file is whole: old or new, never torn
        np.testing.assert_array_equal(q.predict_crops(_crops()).probabilities, want)
