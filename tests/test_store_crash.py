"""A process SIGKILLed while saving leaves the old or the new store, never a torn one
(docs/reliability.md case 5).

Real processes, real files: a child saves a large payload in a loop; the parent kills it at
random moments (seeded) and then loads the store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pft.client.store import EncryptedStore, StoreKey

KEY = bytes(range(32))
SAVER = textwrap.dedent(
    """
    import sys
    import torch
    from pft.client.store import EncryptedStore, StoreKey

    path, start, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = EncryptedStore(path, StoreKey.from_bytes(bytes(range(32))))
    generation = start
    while True:
        weights = torch.full((size,), float(generation))
        store.save({"weights": weights, "generation": generation}, owner="alice")
        print(generation, flush=True)
        generation += 1
    """
)


def check_consistent(store: EncryptedStore, path: Path) -> int:
    payload, _ = store._read_one(path, "alice")
    generation = int(payload["generation"])
    assert torch.all(payload["weights"] == float(generation)), "torn store: weights from another generation"
    return generation


@pytest.mark.slow
def test_sigkill_during_save_never_tears_the_store(tmp_path: Path) -> None:
    rng = random.Random(1234)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    path = tmp_path / "translator.store"
    store = EncryptedStore(path, StoreKey.from_bytes(KEY))
    size = 2_000_000  # 8 MB of float32 per generation
    next_generation, kills, mid_write = 0, 6, 0
    for attempt in range(kills):
        child = subprocess.Popen(
            [sys.executable, str(script), str(path), str(next_generation), str(size)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert child.stdout is not None
        first = child.stdout.readline()  # one complete save, so there is something to keep
        assert first.strip() == str(next_generation), "the saver did not start"
        if attempt % 2:  # aim: kill as soon as a write is under way (its temp file exists)
            deadline = time.monotonic() + 10
            while not list(tmp_path.glob(".translator.store*.tmp")) and time.monotonic() < deadline:
                pass
            time.sleep(rng.uniform(0.0, 0.005))
        else:  # at a random moment
            time.sleep(rng.uniform(0.0, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        mid_write += bool(list(tmp_path.glob(".translator.store*.tmp")))
        result = store.read(owner="alice")
        assert not result.recovered_from_backup, result.failure  # current itself is intact
        generation = check_consistent(store, path)
        assert generation >= next_generation
        if store.backup_path.exists():
            assert check_consistent(store, store.backup_path) <= generation  # equal if killed after rotating
        next_generation = generation + 1
    print(f"{kills} kills, {mid_write} of them during a write (a temp file was left)")
    assert mid_write >= 1, "no kill landed inside a write; the test did not test the crash path"
    # stale temporaries from the kills are cleaned by the next save
    store.save({"weights": torch.zeros(1), "generation": -1}, owner="alice")
    assert not list(tmp_path.glob(".translator.store.*.tmp"))
