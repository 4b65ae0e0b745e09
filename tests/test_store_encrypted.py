"""The on-device encrypted store (docs/reliability.md cases 4 and 5)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pft.client.store import EncryptedStore, StoreKey, generate_key_file, pack_payload, unpack_payload
from pft.core.errors import StoreAuthenticationError, StoreError

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
    store.save(payload(2), owner="alice")
    blob = store.path.read_bytes()
    assert blob[:8] == b"PFTSTORE" and blob[8] == 1 and blob[9] == 0
    salt, nonce = blob[13:29], blob[29:41]
    key = raw_key.derive(salt, 0, 0, 0)
    aad = b'{"format": "pft-store/1", "owner": "alice", "purpose": "s.store"}' + blob[:49]
    plaintext = AESGCM(key).decrypt(nonce, blob[49:], aad)
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
