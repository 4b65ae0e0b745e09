"""DP enrollment through the SDK (docs/reliability.md cases 10, 11): the ledger records each release before it
runs, an over-budget enrollment is refused before anything runs, the ledger survives a restart and
rides in the encrypted store; F and C stay in eval mode and bit-identical."""

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
from pft.core.errors import PrivacyBudgetExceededError
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
    p = Personalizer.from_bundle(world.bundle_v1, world.public_pem, state_dir=state, config=_config(10.0))
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
    # restart: the ledger file alone still refuses
    q = Personalizer.from_installed(state, world.public_pem, config=config)
    assert len(q.privacy_ledger) == 1
    with pytest.raises(PrivacyBudgetExceededError):
        q.enroll_crops(crops, video_ids=vids)
    # the ledger file deleted: the copy inside the encrypted store restores it (epsilon never drops)
    (state / LEDGER_FILE).unlink()
    r = Personalizer.load(state, world.public_pem, KEY, owner="alice", config=config)
    assert r.privacy_ledger == p.privacy_ledger and (state / LEDGER_FILE).is_file()
    with pytest.raises(PrivacyBudgetExceededError):
        r.enroll_crops(crops, video_ids=vids)
