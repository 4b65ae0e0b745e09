"""DP enrollment through the SDK (docs/reliability.md cases 10, 11): the ledger records each release
before it runs, an over-budget enrollment is refused before anything runs, the ledger survives a
restart, is encrypted with the person's key and rides in the personal store too; F and C stay in
eval mode and bit-identical. Issue 19: a deleted, damaged or rolled-back ledger never resets the
budget, concurrent enrollments are all recorded, the budget is pinned in the state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sdk_support import SdkWorld, shared_world

from pft.client.ledger import LEDGER_FILE, PrivacyBudget
from pft.client.sdk import ClientConfig, Personalizer
from pft.client.store import StoreKey
from pft.core.adaptation import AdaptConfig
from pft.core.data import VideoConfig
from pft.core.errors import LedgerIntegrityError, PrivacyBudgetExceededError, StoreError
from pft.core.personalize import PersonalizeConfig
from pft.core.privacy import DPConfig, epsilon_spent, plan_release

KEY = StoreKey.from_bytes(bytes(range(32)))
ADAPT = AdaptConfig(max_iterations=6, min_iterations=2, batch_size=16, lr=0.01)
DP = DPConfig(noise_multiplier=1.5, privacy_unit="video", sample_rate=0.5)


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


def _crops(n: int = 24) -> tuple[np.ndarray, torch.Tensor]:
    crops = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return crops, torch.arange(n) // 8


def _config(budget: float) -> ClientConfig:
    return ClientConfig(
        video=VideoConfig(isolate=False),
        personalize=PersonalizeConfig(adapt=ADAPT, dp=DP),
        privacy_budget=PrivacyBudget(epsilon=budget),
    )


def test_dp_enrollment_records_release_and_keeps_f_and_c(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = Personalizer.from_bundle(
        world.bundle_v1, world.public_pem, state_dir=state, config=_config(10.0), key=KEY, owner="alice"
    )
    f0 = {k: v.clone() for k, v in p.bundle.extractor.state_dict().items()}
    c0 = {k: v.clone() for k, v in p.bundle.classifier.state_dict().items()}
    crops, vids = _crops()
    report = p.enroll_crops(crops, video_ids=vids)
    assert report.privacy is not None and report.privacy["privacy_unit"] == "video"
    expected = epsilon_spent([(1.5, 0.5, ADAPT.max_iterations)], DP.delta)
    assert report.privacy["epsilon"] == pytest.approx(expected) and report.iterations == ADAPT.max_iterations
    assert len(p.privacy_ledger) == 1 and (state / LEDGER_FILE).is_file()
    assert p.privacy_ledger[0]["release"] == report.privacy
    assert not p.bundle.extractor.training and not p.bundle.classifier.training
    assert all(torch.equal(v, p.bundle.extractor.state_dict()[k]) for k, v in f0.items())
    assert all(torch.equal(v, p.bundle.classifier.state_dict()[k]) for k, v in c0.items())
    assert p.info()["privacy_releases"] == 1


@pytest.mark.slow
def test_over_budget_enrollment_is_refused_before_running_and_survives_restart(
    world: SdkWorld, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    crops, vids = _crops()
    one = plan_release(DP, ADAPT, len(crops), vids)
    config = _config(one.epsilon * 1.05)  # room for exactly one enrollment
    p = Personalizer.from_bundle(
        world.bundle_v1, world.public_pem, state_dir=state, config=config, key=KEY, owner="alice"
    )
    p.enroll_crops(crops, video_ids=vids)
    first = p.personalization
    ledger_bytes = (state / LEDGER_FILE).read_bytes()
    with pytest.raises(PrivacyBudgetExceededError, match="nothing was run"):
        p.enroll_crops(crops, video_ids=vids)
    assert p.personalization is first and len(p.privacy_ledger) == 1
    assert (state / LEDGER_FILE).read_bytes() == ledger_bytes
    p.save()
    # restart: the ledger alone (no personal state loaded) still refuses
    q = Personalizer.from_installed(state, world.public_pem, config=config, key=KEY, owner="alice")
    assert len(q.privacy_ledger) == 1
    with pytest.raises(PrivacyBudgetExceededError):
        q.enroll_crops(crops, video_ids=vids)
    # one copy of the ledger deleted: the other holds every release (epsilon never drops)
    (state / LEDGER_FILE).unlink()
    r = Personalizer.load(state, world.public_pem, KEY, owner="alice", config=config)
    assert r.privacy_ledger == p.privacy_ledger
    with pytest.raises(PrivacyBudgetExceededError):
        r.enroll_crops(crops, video_ids=vids)
    # without the store key there is nowhere safe to record a release: refused
    nokey = Personalizer.from_installed(state, world.public_pem, config=config)
    with pytest.raises(StoreError, match="needs the store key"):
        nokey.enroll_crops(crops, video_ids=vids)


# --- issue 19 ---------------------------------------------------------------------------------------
def _enrolled_state(world: SdkWorld, state: Path, config: ClientConfig) -> Personalizer:
    p = Personalizer.from_bundle(
        world.bundle_v1, world.public_pem, state_dir=state, config=config, key=KEY, owner="alice"
    )
    crops, vids = _crops()
    p.enroll_crops(crops, video_ids=vids)
    p.save()
    return p


@pytest.mark.parametrize("damage", ["deleted", "edited"])
def test_a_deleted_or_edited_ledger_never_resets_the_budget(
    world: SdkWorld, tmp_path: Path, damage: str
) -> None:
    state = tmp_path / "state"
    config = _config(100.0)
    p = _enrolled_state(world, state, config)
    spent = p.ledger.epsilon("video")
    for path in sorted(state.glob(f"{LEDGER_FILE}*")):
        if damage == "deleted":
            path.unlink()
        elif not path.name.endswith((".lock", ".counter")):
            blob = bytearray(path.read_bytes())
            blob[-20] ^= 0x01  # e.g. an attempt to lower the recorded noise
            path.write_bytes(bytes(blob))
    for q in (
        Personalizer.from_installed(state, world.public_pem, config=config, key=KEY, owner="alice"),
        Personalizer.load(state, world.public_pem, KEY, owner="alice", config=config),
    ):
        assert q.ledger.problem is not None and q.info()["privacy_ledger_problem"]
        crops, vids = _crops()
        with pytest.raises(LedgerIntegrityError, match="never reset"):
            q.enroll_crops(crops, video_ids=vids)
        assert q.ledger.remaining("video") == 0.0
    # the rest of the SDK keeps working on the person's state
    loaded = Personalizer.load(state, world.public_pem, KEY, owner="alice", config=config)
    assert loaded.enrolled and loaded.predict_crops(_crops(4)[0]).personalized
    assert spent > 0


def test_three_enrollments_at_once_are_all_recorded(world: SdkWorld, tmp_path: Path) -> None:
    import threading

    state = tmp_path / "state"
    config = _config(100.0)
    _enrolled_state(world, state, config)
    devices = [
        Personalizer.from_installed(state, world.public_pem, config=config, key=KEY, owner="alice")
        for _ in range(3)
    ]  # three app processes opened the same state before any of them enrolled
    errors: list[BaseException] = []

    def enroll(p: Personalizer) -> None:
        try:
            crops, vids = _crops()
            p.enroll_crops(crops, video_ids=vids)
            p.save()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(p,)) for p in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = Personalizer.load(state, world.public_pem, KEY, owner="alice", config=config)
    assert len(final.privacy_ledger) == 4  # the first enrollment and the three concurrent ones
    assert [e["seq"] for e in final.privacy_ledger] == [0, 1, 2, 3]


def test_a_later_config_cannot_raise_the_pinned_budget(world: SdkWorld, tmp_path: Path) -> None:
    state = tmp_path / "state"
    crops, vids = _crops()
    one = plan_release(DP, ADAPT, len(crops), vids)
    _enrolled_state(world, state, _config(one.epsilon * 1.05))  # the state is made with room for one
    raised = _config(100.0)  # an app update asks for epsilon 100
    q = Personalizer.load(state, world.public_pem, KEY, owner="alice", config=raised)
    assert q.ledger.budget.epsilon == pytest.approx(one.epsilon * 1.05)
    with pytest.raises(PrivacyBudgetExceededError, match="nothing was run"):
        q.enroll_crops(crops, video_ids=vids)
