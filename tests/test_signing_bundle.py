"""Signed bundles: sign/verify, tampering, unsigned files, rollback, and the device cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from pft.core import signing
from pft.core.errors import (
    BundleError,
    BundleRollbackError,
    BundleSignatureError,
    BundleTamperedError,
    BundleUnsignedFileError,
)
from pft.core.safe_weights import save_safetensors


def make_bundle(folder: Path, version: int, key: Any, seed: int = 0) -> Path:
    """A small bundle: two safetensors files (one in a sub-folder), a JSON file, a signed manifest."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_safetensors({"weight": torch.randn(4, 3, generator=gen)}, folder / "feature_extractor.safetensors")
    save_safetensors({"w": torch.randn(2, 2, generator=gen)}, folder / "parts" / "translator.safetensors")
    (folder / "class_names.json").write_text(json.dumps(["neutral", "happy", "pain"]))
    manifest = {"format": "pft-bundle/1", "bundle_version": version, "created_by": "test"}
    signing.write_manifest_files(folder, manifest)
    signing.sign_bundle(folder, key)
    return folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture()
def key() -> Any:
    return signing.generate_signing_key()


def test_manifest_digests_match_hashlib_oracle(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    digests = signing.manifest_digests(bundle)
    assert list(digests) == [
        "class_names.json",
        "feature_extractor.safetensors",
        "parts/translator.safetensors",
    ]
    for name, entry in digests.items():
        data = (bundle / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_sign_then_verify_returns_the_manifest(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 3, key)
    manifest = signing.verify_bundle(bundle, key.public_key(), min_version=3)
    assert manifest["bundle_version"] == 3
    assert manifest == json.loads((bundle / "manifest.json").read_text())
    sig = json.loads((bundle / "manifest.sig").read_text())
    assert sig["alg"] == "ed25519" and sig["key_id"] == signing.key_id(key.public_key())
    # the digest is the SHA-256 of the canonical bytes (sorted keys, no spaces)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert signing.bundle_digest(manifest) == hashlib.sha256(canonical).hexdigest()


def test_flipped_byte_in_weights_is_tampered_and_named(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    flip_byte(bundle / "parts" / "translator.safetensors", -3)
    with pytest.raises(BundleTamperedError, match=r"parts/translator\.safetensors"):
        signing.verify_bundle(bundle, key.public_key())


def test_missing_and_resized_files_are_tampered(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    with (bundle / "class_names.json").open("ab") as handle:
        handle.write(b" ")
    with pytest.raises(BundleTamperedError, match=r"class_names\.json"):
        signing.verify_bundle(bundle, key.public_key())
    (bundle / "class_names.json").unlink()
    with pytest.raises(BundleTamperedError, match="missing"):
        signing.verify_bundle(bundle, key.public_key())


def test_flipped_byte_in_manifest_breaks_the_signature(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    text = (bundle / "manifest.json").read_text()
    offset = text.index('"created_by": "test"') + len('"created_by": "t')  # inside a value
    flip_byte(bundle / "manifest.json", offset)
    with pytest.raises(BundleSignatureError):
        signing.verify_bundle(bundle, key.public_key())


def test_structural_flip_in_manifest_is_a_signature_error(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    flip_byte(bundle / "manifest.json", 0)  # "{" -> "z": no longer JSON
    with pytest.raises(BundleSignatureError, match="not valid JSON"):
        signing.verify_bundle(bundle, key.public_key())


def test_added_file_is_unsigned(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    (bundle / "parts" / "extra.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(BundleUnsignedFileError, match=r"parts/extra\.pkl"):
        signing.verify_bundle(bundle, key.public_key())


def test_symlink_is_refused_even_to_a_listed_file(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    os.symlink(bundle / "class_names.json", bundle / "alias.json")
    with pytest.raises(BundleUnsignedFileError, match="symlink"):
        signing.verify_bundle(bundle, key.public_key())


def test_listed_file_replaced_by_symlink_is_refused(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    real = tmp_path / "elsewhere.json"
    shutil.move(bundle / "class_names.json", real)
    os.symlink(real, bundle / "class_names.json")
    with pytest.raises(BundleTamperedError, match="not a regular file"):
        signing.verify_bundle(bundle, key.public_key())


def test_wrong_key_and_missing_signature(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    other = signing.generate_signing_key()
    with pytest.raises(BundleSignatureError, match="trusted key"):
        signing.verify_bundle(bundle, other.public_key())
    # a forger who also rewrites key_id still fails the signature check
    sig = json.loads((bundle / "manifest.sig").read_text())
    sig["key_id"] = signing.key_id(other.public_key())
    (bundle / "manifest.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleSignatureError, match="does not match"):
        signing.verify_bundle(bundle, other.public_key())
    (bundle / "manifest.sig").unlink()
    with pytest.raises(BundleSignatureError, match="not signed"):
        signing.verify_bundle(bundle, key.public_key())


def test_rollback_and_equal_version_rules(tmp_path: Path, key: Any) -> None:
    old = make_bundle(tmp_path / "v1", 1, key)
    same_version_other_content = make_bundle(tmp_path / "v2b", 2, key, seed=5)
    v2 = make_bundle(tmp_path / "v2", 2, key)
    v2_digest = signing.bundle_digest(signing.verify_bundle(v2, key.public_key()))
    with pytest.raises(BundleRollbackError, match="older"):
        signing.verify_bundle(old, key.public_key(), min_version=2)
    signing.verify_bundle(v2, key.public_key(), min_version=2, current_digest=v2_digest)
    with pytest.raises(BundleRollbackError, match="content differs"):
        signing.verify_bundle(
            same_version_other_content, key.public_key(), min_version=2, current_digest=v2_digest
        )


def test_manifest_paths_cannot_escape_the_folder(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../outside.bin"] = {"sha256": "0" * 64, "bytes": 0}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    # re-signing goes through the same checks: the publisher cannot sign it either
    with pytest.raises(BundleTamperedError, match="outside the bundle"):
        signing.sign_bundle(bundle, key)


def test_sign_refuses_a_manifest_that_does_not_describe_the_folder(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    (bundle / "late.json").write_text("{}")
    with pytest.raises(BundleUnsignedFileError, match=r"late\.json"):
        signing.sign_bundle(bundle, key)


def test_key_files_round_trip_with_permissions_and_passphrase(tmp_path: Path, key: Any) -> None:
    path = signing.save_signing_key(key, tmp_path / "k.pem", passphrase=b"correct horse")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    loaded = signing.load_signing_key(path, passphrase=b"correct horse")
    assert signing.key_id(loaded.public_key()) == signing.key_id(key.public_key())
    with pytest.raises(BundleError, match="passphrase"):
        signing.load_signing_key(path, passphrase=b"wrong")
    pub = signing.save_public_key(key.public_key(), tmp_path / "k.pub")
    assert signing.key_id(signing.load_public_key(pub)) == signing.key_id(key.public_key())
    assert len(signing.key_id(key.public_key())) == 16


def test_load_public_key_rejects_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    path = tmp_path / "ec.pub"
    path.write_bytes(
        ec_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(BundleError, match="must be Ed25519"):
        signing.load_public_key(path)
    path.write_text("not a key")
    with pytest.raises(BundleError, match="not a PEM public key"):
        signing.load_public_key(path)


def test_write_signing_key_pair_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, pub_path = signing.write_signing_key_pair(tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    private = signing.load_signing_key(key_path)
    assert signing.key_id(private.public_key()) == signing.key_id(signing.load_public_key(pub_path))
    with pytest.raises(FileExistsError):
        signing.write_signing_key_pair(tmp_path)


# --- the device cache (TrustedBundleCache) -------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_install_verify_and_upgrade(tmp_path: Path, key: Any) -> None:
    cache = signing.TrustedBundleCache(tmp_path / "cache", key.public_key())
    assert cache.current() is None
    v1 = make_bundle(tmp_path / "v1", 1, key)
    installed = cache.install(v1)
    assert cache.current() == installed
    assert installed.name == signing.bundle_digest(signing.verify_bundle(v1, key.public_key()))
    path, manifest = cache.load_current()
    assert path == installed and manifest["bundle_version"] == 1
    assert cache.install(v1) == installed  # idempotent
    v2 = make_bundle(tmp_path / "v2", 2, key)
    installed2 = cache.install(v2)
    assert cache.current() == installed2 and installed.exists()  # the previous one is kept
    record = cache.installed()
    assert record is not None and (record.digest, record.bundle_version) == (installed2.name, 2)
    v3 = make_bundle(tmp_path / "v3", 3, key)
    cache.install(v3)
    assert not installed.exists()  # keep=2: the oldest is pruned


def _flip_weights(folder: Path) -> None:
    flip_byte(folder / "feature_extractor.safetensors", -1)


def _flip_manifest(folder: Path) -> None:
    text = (folder / "manifest.json").read_text()
    flip_byte(folder / "manifest.json", text.index('"created_by": "test"') + 16)


def _add_file(folder: Path) -> None:
    (folder / "payload.pkl").write_bytes(b"\x80\x04N.")


def _add_symlink(folder: Path) -> None:
    os.symlink("/etc/passwd", folder / "passwd")


REFUSALS: list[tuple[str, Callable[[Path], None], type[BundleError]]] = [
    ("flipped weights byte", _flip_weights, BundleTamperedError),
    ("flipped manifest byte", _flip_manifest, BundleSignatureError),
    ("added file", _add_file, BundleUnsignedFileError),
    ("added symlink", _add_symlink, BundleUnsignedFileError),
]


@pytest.mark.parametrize(("label", "damage", "error"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_candidate_keeps_the_old_bundle(
    tmp_path: Path, key: Any, label: str, damage: Callable[[Path], None], error: type[BundleError]
) -> None:
    cache = signing.TrustedBundleCache(tmp_path / "cache", key.public_key())
    good = cache.install(make_bundle(tmp_path / "v1", 1, key))
    before = snapshot(tmp_path / "cache")
    candidate = make_bundle(tmp_path / "v2", 2, key, seed=1)
    damage(candidate)
    with pytest.raises(error):
        cache.install(candidate)
    assert cache.current() == good
    signing.verify_bundle(good, key.public_key())
    assert snapshot(tmp_path / "cache") == before  # nothing half-installed is left behind


def test_rollback_and_wrong_key_keep_the_old_bundle(tmp_path: Path, key: Any) -> None:
    cache = signing.TrustedBundleCache(tmp_path / "cache", key.public_key())
    cache.install(make_bundle(tmp_path / "v1", 1, key))
    good = cache.install(make_bundle(tmp_path / "v2", 2, key))
    before = snapshot(tmp_path / "cache")
    with pytest.raises(BundleRollbackError):
        cache.install(tmp_path / "v1")
    with pytest.raises(BundleRollbackError):
        cache.install(make_bundle(tmp_path / "v2-other", 2, key, seed=9))
    other = signing.generate_signing_key()
    with pytest.raises(BundleSignatureError):
        cache.install(make_bundle(tmp_path / "v3-forged", 3, other))
    assert cache.current() == good
    assert cache.load_current()[1]["bundle_version"] == 2
    assert snapshot(tmp_path / "cache") == before


def test_installed_copy_tampered_later_is_detected(tmp_path: Path, key: Any) -> None:
    cache = signing.TrustedBundleCache(tmp_path / "cache", key.public_key())
    installed = cache.install(make_bundle(tmp_path / "v1", 1, key))
    flip_byte(installed / "parts" / "translator.safetensors", 10)
    with pytest.raises(BundleTamperedError):
        cache.load_current()


def test_install_leaves_the_candidate_untouched(tmp_path: Path, key: Any) -> None:
    candidate = make_bundle(tmp_path / "v1", 1, key)
    before = snapshot(candidate)
    signing.TrustedBundleCache(tmp_path / "cache", key.public_key()).install(candidate)
    assert snapshot(candidate) == before


# --- the install pointer is derived from signed data (issue 19) ----------------------------------
def _legacy_pointer(cache_root: Path, folder: Path, version: int) -> None:
    """What an install pointer looked like: unsigned JSON naming the current digest."""
    record = {"digest": folder.name, "bundle_version": version, "previous": None}
    (cache_root / "current.json").write_text(json.dumps(record))


def test_editing_or_deleting_an_install_pointer_does_not_reopen_rollback(tmp_path: Path, key: Any) -> None:
    root = tmp_path / "cache"
    cache = signing.TrustedBundleCache(root, key.public_key())
    v1 = cache.install(make_bundle(tmp_path / "v1", 1, key))
    v2 = cache.install(make_bundle(tmp_path / "v2", 2, key))
    _legacy_pointer(root, v1, 1)  # "point back" at v1
    assert cache.current() == v2
    with pytest.raises(BundleRollbackError):
        cache.install(tmp_path / "v1")
    (root / "current.json").unlink()  # or delete the pointer
    assert cache.current() == v2
    with pytest.raises(BundleRollbackError):
        cache.install(tmp_path / "v1")


def test_an_altered_current_bundle_is_not_replaced_by_an_older_one(tmp_path: Path, key: Any) -> None:
    root = tmp_path / "cache"
    cache = signing.TrustedBundleCache(root, key.public_key())
    cache.install(make_bundle(tmp_path / "v1", 1, key))
    v2 = cache.install(make_bundle(tmp_path / "v2", 2, key))
    manifest = (v2 / "manifest.json").read_text()
    (v2 / "manifest.json").write_text(manifest.replace('"created_by": "test"', '"created_by": "edit"'))
    with pytest.raises(BundleTamperedError, match="altered on this device"):
        cache.current()  # not silently the older v1
    with pytest.raises(BundleRollbackError):
        cache.install(tmp_path / "v1")
    assert cache.install(tmp_path / "v2") == v2  # the same release again repairs it
    assert cache.load_current()[0] == v2


def test_a_validator_runs_on_the_staged_copy_before_it_becomes_current(tmp_path: Path, key: Any) -> None:
    seen: list[Path] = []

    def refuse(folder: Path, manifest: dict[str, Any]) -> None:
        seen.append(folder)
        raise BundleError("cannot load this bundle")

    root = tmp_path / "cache"
    signing.TrustedBundleCache(root, key.public_key()).install(make_bundle(tmp_path / "v1", 1, key))
    strict = signing.TrustedBundleCache(root, key.public_key(), validator=refuse)
    before = snapshot(root)
    with pytest.raises(BundleError, match="cannot load"):
        strict.install(make_bundle(tmp_path / "v2", 2, key))
    assert seen and seen[0].name.startswith(".incoming-")
    assert snapshot(root) == before and strict.load_current()[1]["bundle_version"] == 1


# --- size and nesting limits before any parse (issue 19) ----------------------------------------
def _peak_bytes(action: Callable[[], object]) -> int:
    import tracemalloc

    tracemalloc.start()
    with contextlib.suppress(BundleError):
        action()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_an_oversized_manifest_is_refused_in_bounded_memory(tmp_path: Path, key: Any) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    with (bundle / "manifest.json").open("r+b") as handle:  # 64 MB, sparse: cheap to make
        handle.truncate(64 << 20)
    with pytest.raises(BundleSignatureError, match="larger than"):
        signing.verify_bundle(bundle, key.public_key())
    with pytest.raises(BundleError, match="larger than"):
        signing.read_manifest(bundle)
    assert _peak_bytes(lambda: signing.verify_bundle(bundle, key.public_key())) < 16 << 20


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sig"])
def test_deeply_nested_json_is_a_typed_refusal(tmp_path: Path, key: Any, name: str) -> None:
    bundle = make_bundle(tmp_path / "b", 1, key)
    depth = 1500 if name == "manifest.sig" else 100_000  # the signature record is capped at 4 KB
    (bundle / name).write_text("[" * depth + "]" * depth)  # beyond the parser's recursion limit
    with pytest.raises(BundleSignatureError, match="nested deeper"):
        signing.verify_bundle(bundle, key.public_key())
    (bundle / name).write_text('{"a": ' * 40 + "1" + "}" * 40)  # parses, but deeper than allowed
    with pytest.raises(BundleSignatureError, match="nested deeper"):
        signing.verify_bundle(bundle, key.public_key())
