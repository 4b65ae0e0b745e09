"""The per-device privacy ledger (pft.client.ledger): docs/reliability.md case 10.

Budget exhaustion is refused before anything runs and nothing is appended; the cumulative epsilon
is the accountant over the whole history; the ledger survives restarts and a SIGKILL in the middle
of appends (epsilon never goes down or skips a release).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pft.client.ledger import PrivacyBudget, PrivacyLedger
from pft.core.adaptation import AdaptConfig
from pft.core.errors import PrivacyBudgetExceededError, StoreError
from pft.core.privacy import DPConfig, DPRelease, PrivacyUnit, epsilon_spent, plan_release


def _release(sigma: float = 1.0, q: float = 0.2, steps: int = 50, unit: PrivacyUnit = "frame") -> DPRelease:
    eps = epsilon_spent([(sigma, q, steps)], 1e-5)
    return DPRelease(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        privacy_unit=unit,
        records=100,
        epsilon=eps,
    )


def test_cumulative_epsilon_is_the_accountant_over_the_history(tmp_path: Path) -> None:
    ledger = PrivacyLedger(PrivacyBudget(epsilon=100.0), tmp_path / "l.json")
    a, b = _release(1.0, 0.2, 50), _release(2.0, 0.5, 30)
    e1 = ledger.record(a, "adaptation")
    e2 = ledger.record(b, "adaptation")
    assert e1["cumulative_epsilon"] == pytest.approx(a.epsilon)
    assert e2["cumulative_epsilon"] == pytest.approx(epsilon_spent([a.mechanism, b.mechanism], 1e-5))
    assert e2["cumulative_epsilon"] < a.epsilon + b.epsilon  # composition beats summing
    assert e2["release"]["privacy_unit"] == "frame"
    # units are accounted apart
    ledger.record(_release(unit="video"), "adaptation")
    assert ledger.epsilon("frame") == pytest.approx(e2["cumulative_epsilon"])
    assert ledger.epsilon("video") == pytest.approx(_release().epsilon)


def test_over_budget_release_is_refused_and_nothing_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    one = _release(1.0, 0.2, 50)
    ledger = PrivacyLedger(PrivacyBudget(epsilon=one.epsilon * 1.05), path)
    ledger.record(one, "adaptation")
    before = path.read_bytes()
    with pytest.raises(PrivacyBudgetExceededError, match="nothing was run"):
        ledger.record(one, "adaptation")
    assert len(ledger) == 1 and path.read_bytes() == before
    with pytest.raises(PrivacyBudgetExceededError, match="delta"):
        ledger.check(_release().model_copy(update={"delta": 1e-3}))
    with pytest.raises(PrivacyBudgetExceededError):  # no noise = infinite epsilon
        ledger.check(_release(sigma=0.0))
    assert ledger.remaining("frame") == pytest.approx(one.epsilon * 0.05)


def test_ledger_survives_restart_and_refuses_a_foreign_or_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    budget = PrivacyBudget(epsilon=50.0)
    ledger = PrivacyLedger.open(path, budget)
    for _ in range(3):
        ledger.record(_release(), "adaptation")
    again = PrivacyLedger.open(path, budget)
    assert again.as_list() == ledger.as_list() and again.epsilon("frame") == ledger.epsilon("frame")
    path.write_text("{not json")
    with pytest.raises(StoreError):
        PrivacyLedger.open(path, budget)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StoreError, match="not a privacy ledger"):
        PrivacyLedger.open(path, budget)


def test_merge_keeps_the_longer_history_and_refuses_disagreement(tmp_path: Path) -> None:
    budget = PrivacyBudget(epsilon=50.0)
    full = PrivacyLedger(budget)
    for s in (1.0, 1.5, 2.0):
        full.record(_release(sigma=s), "adaptation")
    short = PrivacyLedger(budget, tmp_path / "l.json", full.as_list()[:1])
    short.merge(full.as_list())
    assert len(short) == 3 and PrivacyLedger.open(tmp_path / "l.json", budget).as_list() == full.as_list()
    short.merge(full.as_list()[:2])  # a shorter prefix changes nothing
    assert len(short) == 3
    other = PrivacyLedger(budget)
    other.record(_release(sigma=3.0), "adaptation")
    with pytest.raises(StoreError, match="disagree"):
        short.merge(other.as_list())


_WRITER = """
import sys
from pft.client.ledger import PrivacyBudget, PrivacyLedger
from pft.core.privacy import DPRelease
path = sys.argv[1]
ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=1e9))
r = DPRelease(noise_multiplier=1.0, sample_rate=0.2, steps=5, delta=1e-5, max_grad_norm=1.0,
              accountant="rdp", privacy_unit="frame", records=10, epsilon=1.0)
ledger.check(r)  # the accountant (Opacus, imported on first use) is loaded before "ready"
print("ready", flush=True)
while True:
    ledger.record(r, "adaptation")
"""


@pytest.mark.slow
def test_ledger_survives_sigkill_during_appends(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    budget = PrivacyBudget(epsilon=1e9)
    seen_len, seen_eps = 0, 0.0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for k in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.17 * k)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ledger = PrivacyLedger.open(path, budget)  # loads: never a torn file
        eps = ledger.epsilon("frame")
        assert len(ledger) >= seen_len and eps >= seen_eps  # never goes down
        assert [e["seq"] for e in ledger.as_list()] == list(range(len(ledger)))  # skips nothing
        cumulative = [e["cumulative_epsilon"] for e in ledger.as_list()]
        assert cumulative == sorted(cumulative)
        seen_len, seen_eps = len(ledger), eps
    assert seen_len > 0
    assert not [p for p in tmp_path.iterdir() if p.name != "ledger.json" and not p.name.endswith(".tmp")]


def test_planned_release_from_a_target_epsilon_fits_its_budget() -> None:
    vids = torch.arange(120) // 40
    release = plan_release(DPConfig(epsilon=2.0), AdaptConfig(), 120, vids)
    ledger = PrivacyLedger(PrivacyBudget(epsilon=2.0))
    ledger.record(release, "adaptation")
    with pytest.raises(PrivacyBudgetExceededError):
        ledger.record(release, "adaptation")
