"""The per-device privacy ledger (pft.client.ledger): docs/reliability.md case 10.

Budget exhaustion is refused before anything runs and nothing is appended; the cumulative epsilon
is the accountant over the whole history; the ledger survives restarts and a SIGKILL in the middle
of appends (epsilon never goes down or skips a release). On a device it is encrypted, bound to the
owner, mirrored and locked: concurrent releases are all recorded, a damaged, rolled-back or
missing ledger refuses releases instead of resetting, and the budget is pinned at creation.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pft.client.ledger import LEDGER_FILE, PrivacyBudget, PrivacyLedger
from pft.client.store import StoreKey
from pft.core.adaptation import AdaptConfig
from pft.core.errors import LedgerIntegrityError, PrivacyBudgetExceededError
from pft.core.privacy import DPConfig, DPRelease, PrivacyUnit, epsilon_spent, plan_release

KEY = StoreKey.from_bytes(bytes(range(32)))


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


def _open(path: Path, epsilon: float = 50.0, **kwargs: object) -> PrivacyLedger:
    return PrivacyLedger.open(path, PrivacyBudget(epsilon=epsilon), key=KEY, owner="alice", **kwargs)  # type: ignore[arg-type]


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name)}


def test_cumulative_epsilon_is_the_accountant_over_the_history(tmp_path: Path) -> None:
    ledger = _open(tmp_path / LEDGER_FILE, 100.0)
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
    # nothing readable on disk
    assert all(b"epsilon" not in blob for blob in _files(tmp_path / LEDGER_FILE).values())


def test_over_budget_release_is_refused_and_nothing_is_appended(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    one = _release(1.0, 0.2, 50)
    ledger = _open(path, one.epsilon * 1.05)
    ledger.record(one, "adaptation")
    before = _files(path)
    with pytest.raises(PrivacyBudgetExceededError, match="nothing was run"):
        ledger.record(one, "adaptation")
    assert len(ledger) == 1 and _files(path) == before
    with pytest.raises(PrivacyBudgetExceededError, match="delta"):
        ledger.check(_release().model_copy(update={"delta": 1e-3}))
    with pytest.raises(PrivacyBudgetExceededError):  # no noise = infinite epsilon
        ledger.check(_release(sigma=0.0))
    assert ledger.remaining("frame") == pytest.approx(one.epsilon * 0.05)


def test_ledger_survives_restart_and_a_foreign_one_refuses_releases(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _open(path)
    for _ in range(3):
        ledger.record(_release(), "adaptation")
    again = _open(path)
    assert again.as_list() == ledger.as_list() and again.epsilon("frame") == ledger.epsilon("frame")
    bob = PrivacyLedger.open(path, PrivacyBudget(epsilon=50.0), key=KEY, owner="bob")  # not his
    assert bob.problem is not None and "another owner" in bob.problem
    with pytest.raises(LedgerIntegrityError, match="never reset"):
        bob.record(_release(), "adaptation")
    assert len(_open(path)) == 3


def test_merge_keeps_the_longer_history_and_marks_disagreement(tmp_path: Path) -> None:
    budget = PrivacyBudget(epsilon=50.0)
    full = PrivacyLedger(budget)
    for s in (1.0, 1.5, 2.0):
        full.record(_release(sigma=s), "adaptation")
    short = _open(tmp_path / LEDGER_FILE)
    short.record(_release(sigma=1.0), "adaptation")
    short.merge(full.as_list())
    assert len(short) == 3 and _open(tmp_path / LEDGER_FILE).as_list() == short.as_list()
    short.merge(full.as_list()[:2])  # a shorter prefix changes nothing
    assert len(short) == 3 and short.problem is None
    other = PrivacyLedger(budget)
    other.record(_release(sigma=3.0), "adaptation")
    short.merge(other.as_list())
    assert short.problem is not None and "disagree" in short.problem
    with pytest.raises(LedgerIntegrityError):
        short.record(_release(), "adaptation")


# --- issue 19: locked, authenticated, pinned, never reset ----------------------------------------
def test_concurrent_releases_on_one_state_are_all_recorded(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledgers = [_open(path, 1e9) for _ in range(3)]  # three enrollments opened the state at once
    start = threading.Barrier(3)

    def enroll(ledger: PrivacyLedger) -> None:
        start.wait()
        for _ in range(2):
            ledger.record(_release(), "adaptation")

    threads = [threading.Thread(target=enroll, args=(ledger,)) for ledger in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = _open(path, 1e9)
    assert len(final) == 6 and [e["seq"] for e in final.as_list()] == list(range(6))
    assert final.epsilon("frame") == pytest.approx(epsilon_spent([_release().mechanism] * 6, 1e-5))


def test_the_budget_is_pinned_when_the_ledger_is_created(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    one = _release()
    room = (one.epsilon + epsilon_spent([one.mechanism] * 2, 1e-5)) / 2  # one release, not two
    _open(path, room).record(one, "adaptation")
    later = _open(path, 100.0)  # an app update asks for epsilon 100
    assert later.budget.epsilon == pytest.approx(room)
    with pytest.raises(PrivacyBudgetExceededError, match="above the budget"):
        later.record(one, "adaptation")
    tighter = _open(path, one.epsilon * 1.1)  # lowering is allowed
    assert tighter.budget.epsilon == pytest.approx(one.epsilon * 1.1)
    other = PrivacyLedger.open(path, PrivacyBudget(epsilon=100.0, delta=1e-3), key=KEY, owner="alice")
    assert other.budget.delta == 1e-5  # and delta cannot be loosened either


def test_a_rolled_back_or_damaged_ledger_refuses_releases_instead_of_resetting(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _open(path)
    ledger.record(_release(), "adaptation")
    saved = _files(path)
    ledger.record(_release(), "adaptation")
    ledger.record(_release(), "adaptation")
    spent = ledger.epsilon("frame")
    for name, blob in saved.items():  # put the one-release ledger back (both copies and the counter)
        if not name.endswith(".counter"):
            (tmp_path / name).write_bytes(blob)
    rolled = _open(path)
    assert rolled.problem is not None and "older copy" in rolled.problem
    with pytest.raises(LedgerIntegrityError):
        rolled.record(_release(), "adaptation")
    assert rolled.remaining("frame") == 0.0
    # restore, then damage both copies: refused, never reset to zero
    for name in saved:
        (tmp_path / name).unlink()
    fresh = _open(tmp_path / "l2.store")
    fresh.record(_release(), "adaptation")
    for name in ("l2.store", "l2.store.copy"):
        blob = bytearray((tmp_path / name).read_bytes())
        blob[-3] ^= 1
        (tmp_path / name).write_bytes(bytes(blob))
    broken = _open(tmp_path / "l2.store")
    assert broken.problem is not None
    with pytest.raises(LedgerIntegrityError):
        broken.record(_release(), "adaptation")
    assert spent > 0


def test_a_torn_copy_loses_no_release(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    ledger = _open(path)
    for _ in range(3):
        ledger.record(_release(), "adaptation")
    path.write_bytes(path.read_bytes()[:57])  # the main copy torn mid-write
    again = _open(path)
    assert again.problem is None and len(again) == 3
    again.record(_release(), "adaptation")  # and the next release heals both copies
    assert len(_open(path)) == 4 and path.read_bytes() == (tmp_path / f"{LEDGER_FILE}.copy").read_bytes()


def test_a_missing_ledger_on_a_state_with_personal_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    _open(path).record(_release(), "adaptation")
    for entry in list(tmp_path.iterdir()):  # every file of the ledger deleted, counter included
        entry.unlink()
    missing = _open(path, expect_existing=True)
    assert missing.problem is not None and "missing" in missing.problem
    with pytest.raises(LedgerIntegrityError):
        missing.record(_release(), "adaptation")


_WRITER = """
import sys
from pft.client.ledger import PrivacyBudget, PrivacyLedger
from pft.client.store import StoreKey
from pft.core.privacy import DPRelease
path = sys.argv[1]
ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=1e9), key=StoreKey.from_bytes(bytes(range(32))),
                            owner="alice")
r = DPRelease(noise_multiplier=1.0, sample_rate=0.2, steps=5, delta=1e-5, max_grad_norm=1.0,
              accountant="rdp", privacy_unit="frame", records=10, epsilon=1.0)
ledger.check(r)  # the accountant (Opacus, imported on first use) is loaded before "ready"
print("ready", flush=True)
while True:
    ledger.record(r, "adaptation")
"""


@pytest.mark.slow
def test_ledger_survives_sigkill_during_appends(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
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
        ledger = _open(path, 1e9)  # loads: never a torn ledger
        assert ledger.problem is None, ledger.problem
        eps = ledger.epsilon("frame")
        assert len(ledger) >= seen_len and eps >= seen_eps  # never goes down
        assert [e["seq"] for e in ledger.as_list()] == list(range(len(ledger)))  # skips nothing
        cumulative = [e["cumulative_epsilon"] for e in ledger.as_list()]
        assert cumulative == sorted(cumulative)
        seen_len, seen_eps = len(ledger), eps
    assert seen_len > 0
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_planned_release_from_a_target_epsilon_fits_its_budget() -> None:
    vids = torch.arange(120) // 40
    release = plan_release(DPConfig(epsilon=2.0), AdaptConfig(), 120, vids)
    ledger = PrivacyLedger(PrivacyBudget(epsilon=2.0))
    ledger.record(release, "adaptation")
    with pytest.raises(PrivacyBudgetExceededError):
        ledger.record(release, "adaptation")
