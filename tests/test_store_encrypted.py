"""The on-device encrypted store (docs/reliability.md cases 4 and 5)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pft.client.store import EncryptedStore, StoreKey, generate_key_file, pack_payload, unpack_payload
from pft.core.errors import StoreAuthenticationError, StoreError, StoreRollbackError

# Cheap scrypt for tests; the default (n=2**15) is exercised once below.
FAST = {"n": 2**10, "r": 8, "p": 1}


def payload(generation: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(generation)
    return {
        "translator": {"fc.weight": torch.randn(4, 3, generator=gen), "fc.bias": torch.zeros(4)},
        "steps": torch.tensor([generation], dtype=torch.int64),
        "ledger": {"epsilon": 0.5 * generation, "releases": [1, 2, 3], "unit": "person"},
        "blob": b"\x00\xffraw",
        "name": "alice",
        "generation": generation,
        "flag": True,
        "nothing": None,
    }


def assert_payload_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value)
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            assert_payload_equal(got[key], value)
        else:
            assert got[key] == value


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture()
def raw_key() -> StoreKey:
    return StoreKey.from_bytes(bytes(range(32)))


def test_round_trip_with_raw_key(tmp_path: Path, raw_key: StoreKey) -> None:
    store = EncryptedStore(tmp_path / "translator.store", raw_key)
    assert not store.exists()
    store.save(payload(1), owner="alice")
    result = store.read(owner="alice")
    assert not result.recovered_from_backup and result.source == store.path
    assert_payload_equal(result.payload, payload(1))
    # nothing readable in the ciphertext
    blob = store.path.read_bytes()
    assert b"alice" not in blob and b"epsilon" not in blob and b"translator" not in blob


def test_round_trip_with_default_scrypt_passphrase(tmp_path: Path) -> None:
    key = StoreKey.from_passphrase("correct horse battery staple")
    assert (key.log2_n, key.r, key.p) == (15, 8, 1)
    store = EncryptedStore(tmp_path / "s.store", key)
    store.save({"x": 1}, owner="alice")
    fresh = EncryptedStore(tmp_path / "s.store", StoreKey.from_passphrase("correct horse battery staple"))
    assert fresh.load(owner="alice") == {"x": 1}


def test_ciphertext_is_plain_aes_gcm_over_the_container(tmp_path: Path, raw_key: StoreKey) -> None:
    """Oracle: decrypt by hand with the documented layout and compare with the container bytes."""
    store = EncryptedStore(tmp_path / "s.store", raw_key)
    store.save(payload(1), owner="alice")
    store.save(payload(2), owner="alice")
    blob = store.path.read_bytes()
    assert blob[:8] == b"PFTSTORE" and blob[8] == 2 and blob[9] == 0
    salt, nonce = blob[13:29], blob[29:41]
    assert struct.unpack("<Q", blob[57:65]) == (2,)  # the generation counter: the second save
    assert (tmp_path / "s.store.counter").read_text() == "2 1\n"  # newest, and the one in .prev
    key = raw_key.derive(salt, 0, 0, 0)
    binding = b'{"format": "pft-store/2", "owner": "alice", "purpose": "s.store"}'
    assert blob[41:49] == hmac.new(key, b"pft-store key check", hashlib.sha256).digest()[:8]
    assert blob[49:57] == hmac.new(key, b"pft-store binding check" + binding, hashlib.sha256).digest()[:8]
    plaintext = AESGCM(key).decrypt(nonce, blob[65:], binding + blob[:65])
    assert plaintext == pack_payload(payload(2))
    assert_payload_equal(unpack_payload(plaintext, "x"), payload(2))


def test_flipped_byte_fails_and_previous_generation_loads(
    tmp_path: Path, raw_key: StoreKey, caplog: Any
) -> None:
    store = EncryptedStore(tmp_path / "s.store", raw_key)
    store.save(payload(1), owner="alice")
    store.save(payload(2), owner="alice")
    flip_byte(store.path, -40)  # inside the ciphertext
    with pytest.raises(StoreAuthenticationError, match="authentication failed"):
        store._read_one(store.path, "alice")
    with caplog.at_level(logging.WARNING):
        result = store.read(owner="alice")
    assert result.recovered_from_backup and result.source == store.backup_path
    assert "authentication failed" in (result.failure or "")
    assert_payload_equal(result.payload, payload(1))
    assert "last good copy" in caplog.text
    # the next save keeps the good .prev (the corrupt file is not rotated into it)
    store.save(payload(3), owner="alice")
    assert_payload_equal(store.load(owner="alice"), payload(3))
    flip_byte(store.path, 60)
    assert_payload_equal(store.load(owner="alice"), payload(1))


def test_both_generations_corrupt_is_a_clear_error(tmp_path: Path, raw_key: StoreKey) -> None:
    store = EncryptedStore(tmp_path / "s.store", raw_key)
    store.save(payload(1), owner="alice")
    store.save(payload(2), owner="alice")
    flip_byte(store.path, -1)
    flip_byte(store.backup_path, -1)
    with pytest.raises(StoreAuthenticationError, match="previous copy failed too"):
        store.load(owner="alice")


def test_ciphertext_moved_to_another_owner_fails(tmp_path: Path, raw_key: StoreKey) -> None:
    alice = EncryptedStore(tmp_path / "alice" / "translator.store", raw_key)
    bob = EncryptedStore(tmp_path / "bob" / "translator.store", raw_key)
    alice.save(payload(1), owner="alice")
    bob.save(payload(2), owner="bob")
    bob.save(payload(3), owner="bob")
    bob.path.write_bytes(alice.path.read_bytes())  # same key, same purpose: only the owner differs
    with pytest.raises(StoreAuthenticationError, match="another owner"):
        bob._read_one(bob.path, "bob")
    result = bob.read(owner="bob")  # bob's own last good copy is still there
    assert result.recovered_from_backup
    assert_payload_equal(result.payload, payload(2))


def test_ciphertext_renamed_to_another_purpose_fails(tmp_path: Path, raw_key: StoreKey) -> None:
    ledger = EncryptedStore(tmp_path / "ledger.store", raw_key)
    ledger.save({"epsilon": 0.1}, owner="alice")
    (tmp_path / "translator.store").write_bytes(ledger.path.read_bytes())
    with pytest.raises(StoreAuthenticationError):
        EncryptedStore(tmp_path / "translator.store", raw_key).load(owner="alice")


def test_wrong_passphrase_fails_and_does_not_overwrite(tmp_path: Path) -> None:
    store = EncryptedStore(tmp_path / "s.store", StoreKey.from_passphrase("right", **FAST))
    store.save(payload(1), owner="alice")
    wrong = EncryptedStore(tmp_path / "s.store", StoreKey.from_passphrase("wrong", **FAST))
    with pytest.raises(StoreAuthenticationError, match="wrong passphrase"):
        wrong.load(owner="alice")
    before = store.path.read_bytes()
    with pytest.raises(StoreAuthenticationError, match="refusing to overwrite"):
        wrong.save(payload(9), owner="alice")
    assert store.path.read_bytes() == before
    with pytest.raises(StoreAuthenticationError, match="protected by a passphrase"):
        EncryptedStore(tmp_path / "s.store", StoreKey.from_bytes(b"k" * 32)).load(owner="alice")


def test_salt_is_per_store_and_reused_across_saves(tmp_path: Path) -> None:
    key = StoreKey.from_passphrase("pw", **FAST)
    a = EncryptedStore(tmp_path / "a.store", key)
    b = EncryptedStore(tmp_path / "b.store", key)
    a.save({"x": 1}, owner="u")
    b.save({"x": 1}, owner="u")
    salt_a, salt_b = a.path.read_bytes()[13:29], b.path.read_bytes()[13:29]
    assert salt_a != salt_b
    EncryptedStore(tmp_path / "a.store", StoreKey.from_passphrase("pw", **FAST)).save({"x": 2}, owner="u")
    assert a.path.read_bytes()[13:29] == salt_a
    assert a.path.read_bytes()[29:41] != a.backup_path.read_bytes()[29:41]  # fresh nonce per save


def test_key_file_and_unsupported_values(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "device.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    (tmp_path / "hex.key").write_text(path.read_bytes().hex() + "\n")
    a = EncryptedStore(tmp_path / "s.store", StoreKey.from_file(path))
    a.save({"x": [1, (2, 3)]}, owner="u")
    assert EncryptedStore(tmp_path / "s.store", StoreKey.from_file(tmp_path / "hex.key")).load(owner="u") == {
        "x": [1, [2, 3]]
    }
    with pytest.raises(StoreError, match="cannot store a set"):
        a.save({"x": {1, 2}}, owner="u")
    with pytest.raises(StoreError, match="reserved"):
        a.save({"__pft_tensor__": "t0"}, owner="u")
    with pytest.raises(StoreError, match="owner"):
        a.save({"x": 1}, owner="")
    with pytest.raises(StoreError, match="32 bytes"):
        StoreKey.from_bytes(b"short")
    with pytest.raises(StoreError, match="no store here yet"):
        EncryptedStore(tmp_path / "none.store", StoreKey.from_file(path)).load(owner="u")
    assert repr(StoreKey.from_file(path)) == "StoreKey(raw)"


def test_stale_temporaries_are_cleaned(tmp_path: Path, raw_key: StoreKey) -> None:
    store = EncryptedStore(tmp_path / "s.store", raw_key)
    stale = tmp_path / ".s.store.abc123.tmp"
    stale.write_bytes(os.urandom(100))
    store.save({"x": 1}, owner="u")
    assert not stale.exists()


# --- generations bound to a counter; nothing the right key opens is ever overwritten (issue 19) --
def test_an_older_ciphertext_copied_over_the_current_one_is_refused(
    tmp_path: Path, raw_key: StoreKey
) -> None:
    store = EncryptedStore(tmp_path / "s.store", raw_key)
    store.save(payload(1), owner="alice")
    first = store.path.read_bytes()
    store.save(payload(2), owner="alice")
    store.save(payload(3), owner="alice")
    store.path.write_bytes(first)  # a backup of generation 1 put back in place
    result = store.read(owner="alice")
    assert result.recovered_from_backup and "older copy" in (result.failure or "")
    assert_payload_equal(result.payload, payload(2))  # the kept previous generation, not generation 1
    store.backup_path.write_bytes(first)  # and over the previous generation too
    with pytest.raises(StoreRollbackError, match="older copy"):
        store.read(owner="alice")
    # the next save still goes forward (generation 4), and reads back as current
    store.save(payload(4), owner="alice")
    again = store.read(owner="alice")
    assert not again.recovered_from_backup and again.generation == 4


@pytest.mark.parametrize("mistake", ["passphrase", "owner"])
def test_a_mistyped_passphrase_or_owner_never_destroys_the_state(tmp_path: Path, mistake: str) -> None:
    path = tmp_path / "personal.store"
    right = EncryptedStore(path, StoreKey.from_passphrase("right", **FAST))
    right.save(payload(1), owner="alice")
    right.save(payload(2), owner="alice")
    path.write_bytes(path.read_bytes()[:30])  # the current generation is torn; .prev (generation 1) is good
    wrong_key = StoreKey.from_passphrase("wrogn", **FAST) if mistake == "passphrase" else right.key
    owner = "alice" if mistake == "passphrase" else "alcie"
    wrong = EncryptedStore(path, wrong_key)
    for attempt in range(2):  # two saves (or two enrolls) with the mistake
        with pytest.raises(StoreAuthenticationError, match="refusing to overwrite"):
            wrong.save(payload(10 + attempt), owner=owner)
    result = EncryptedStore(path, StoreKey.from_passphrase("right", **FAST)).read(owner="alice")
    assert_payload_equal(result.payload, payload(1))


def test_update_is_one_transaction_under_the_lock(tmp_path: Path, raw_key: StoreKey) -> None:
    import threading

    path = tmp_path / "counter.store"
    EncryptedStore(path, raw_key).save({"n": 0, "who": []}, owner="u")

    def bump(k: int) -> None:
        store = EncryptedStore(path, StoreKey.from_bytes(bytes(range(32))))  # one per writer
        for _ in range(5):
            store.update(lambda p: {"n": p["n"] + 1, "who": [*p["who"], k]}, owner="u")  # type: ignore[index]

    threads = [threading.Thread(target=bump, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = EncryptedStore(path, raw_key).load(owner="u")
    assert final["n"] == 20 and sorted(final["who"]) == sorted(list(range(4)) * 5)


def test_mirror_mode_loses_nothing_when_one_copy_is_damaged(tmp_path: Path, raw_key: StoreKey) -> None:
    store = EncryptedStore(tmp_path / "l.store", raw_key, backup="mirror")
    store.save(payload(1), owner="alice")
    store.save(payload(2), owner="alice")
    assert store.backup_path.name == "l.store.copy"
    assert store.backup_path.read_bytes() == store.path.read_bytes()
    store.path.write_bytes(store.path.read_bytes()[:100])  # torn main copy
    result = store.read(owner="alice")
    assert result.recovered_from_backup and result.generation == 2
    assert_payload_equal(result.payload, payload(2))  # the newest generation, not one behind
    store.save(payload(3), owner="alice")  # heals both copies
    store.backup_path.write_bytes(b"")
    assert_payload_equal(store.load(owner="alice"), payload(3))
    store.path.write_bytes(b"")
    with pytest.raises(StoreAuthenticationError, match="mirror copy failed too"):
        store.load(owner="alice")


def test_a_store_key_file_is_never_replaced_silently(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "store.key")
    key = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to replace a store key"):
        generate_key_file(path)
    assert path.read_bytes() == key
    assert generate_key_file(path, overwrite=True).read_bytes() != key
