"""Signed model bundles: a manifest of per-file SHA-256 digests, signed with Ed25519.

The scheme follows OpenSSF model-signing: the publisher lists every file of a bundle folder with
its digest and size in ``manifest.json`` and signs the canonical bytes of that manifest; a device
accepts a bundle only if, in this order,

1. ``manifest.sig`` verifies over the canonical manifest with the trusted public key,
2. every listed file is present with the listed size and SHA-256,
3. no file is present that the manifest does not list (symlinks and special files are refused),
4. the bundle's version is not older than the one already installed (rollback protection).

:class:`TrustedBundleCache` installs verified bundles on a device so that a refused candidate
never replaces the bundle it had (docs/reliability.md case 2). Every file is read with a size and
nesting limit before it is parsed (:mod:`pft.core.untrusted_json`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pft.core.atomic import atomic_write_bytes, atomic_write_text, fsync_directory
from pft.core.errors import (
    BundleError,
    BundleRollbackError,
    BundleSignatureError,
    BundleTamperedError,
    BundleUnsignedFileError,
)
from pft.core.untrusted_json import parse_untrusted_json, read_bounded

__all__ = [
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_ALGORITHM",
    "SIGNATURE_NAME",
    "BundleValidator",
    "InstalledBundle",
    "TrustedBundleCache",
    "bundle_digest",
    "canonical_manifest_bytes",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "manifest_digests",
    "read_manifest",
    "save_public_key",
    "save_signing_key",
    "sign_bundle",
    "verify_bundle",
    "write_manifest_files",
    "write_signing_key_pair",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_ALGORITHM = "ed25519"
#: Largest ``manifest.json`` / ``manifest.sig`` accepted; refused before they are parsed.
MAX_MANIFEST_BYTES = 4 << 20
MAX_SIGNATURE_BYTES = 4096
_RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
_CHUNK = 1 << 20


# --- keys --------------------------------------------------------------------------------------
def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 bundle-signing key."""
    return Ed25519PrivateKey.generate()


def save_signing_key(key: Ed25519PrivateKey, path: str | Path, passphrase: bytes | None = None) -> Path:
    """Write a signing key as PEM PKCS#8, readable by its owner only (mode 0600).

    Parameters
    ----------
    key:
        The private key.
    path:
        Destination file (written atomically).
    passphrase:
        If given, the PEM is encrypted with it (best available PKCS#8 encryption).

    Returns
    -------
    Path
        The written path.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    path = atomic_write_bytes(path, pem)  # mkstemp creates the file 0600 before any byte is written
    os.chmod(path, 0o600)
    return path


def load_signing_key(path: str | Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Read an Ed25519 signing key written by :func:`save_signing_key`.

    Raises
    ------
    BundleError
        If the file is missing, the passphrase is wrong, or it is not an Ed25519 key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the signing key ({exc.strerror})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # passphrase given for an unencrypted key, or missing for an encrypted one
        raise BundleError(f"{path}: {exc}; pass the passphrase the key was saved with") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            f"{path}: not a readable PEM private key, or the passphrase is wrong ({exc})"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: the signing key must be Ed25519, got {type(key).__name__}")
    return key


def save_public_key(public_key: Ed25519PublicKey, path: str | Path) -> Path:
    """Write a public key as PEM SubjectPublicKeyInfo (mode 0644)."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = atomic_write_bytes(path, pem)
    os.chmod(path, 0o644)
    return path


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read a trusted bundle-verification key (PEM SubjectPublicKeyInfo, Ed25519).

    Raises
    ------
    BundleError
        If the file is missing, not PEM, or holds a key of another type.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the public key ({exc.strerror})") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{path}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(
            f"{path}: the bundle-verification key must be Ed25519, got {type(key).__name__}; "
            "use the `bundle-signing.pub` written by `pft keys signing`"
        )
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of SHA-256(raw public bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_signing_key_pair(
    out_dir: str | Path, passphrase: bytes | None = None, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Create ``bundle-signing.key`` (0600) and ``bundle-signing.pub`` in ``out_dir``.

    Raises
    ------
    FileExistsError
        If a key is already there and ``overwrite`` is false (losing a trust root is not undoable).
    """
    out = Path(out_dir)
    key_path, pub_path = out / "bundle-signing.key", out / "bundle-signing.pub"
    for existing in (key_path, pub_path):
        if existing.exists() and not overwrite:
            raise FileExistsError(f"{existing} already exists; refusing to replace a signing key")
    key = generate_signing_key()
    save_signing_key(key, key_path, passphrase)
    save_public_key(key.public_key(), pub_path)
    return key_path, pub_path


# --- manifest ---------------------------------------------------------------------------------
def _parse_manifest(
    data: bytes, where: str = "<manifest>", error: type[BundleError] = BundleError
) -> dict[str, Any]:
    """Parse manifest bytes strictly: size and depth limits, one JSON object, no duplicate keys,
    no NaN/Infinity. Every refusal is ``error``."""
    parsed = parse_untrusted_json(
        data, where=where, error=error, max_bytes=MAX_MANIFEST_BYTES, what="manifest"
    )
    if not isinstance(parsed, dict):
        raise error(f"{where}: the manifest is not a JSON object")
    return parsed


def canonical_manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: ``json.dumps(sort_keys=True, separators=(",", ":"))`` in UTF-8."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def bundle_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical manifest: one name for one exact bundle content."""
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and strictly parse ``folder/manifest.json`` (NOT verified; see :func:`verify_bundle`).

    At most :data:`MAX_MANIFEST_BYTES` are read.

    Raises
    ------
    BundleError
        If the file is missing, too large, or is not a JSON object.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        data = read_bounded(path, MAX_MANIFEST_BYTES, BundleError, "manifest")
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: cannot read the manifest (missing)") from exc
    return _parse_manifest(data, str(path))


def _file_digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _walk_bundle(folder: Path) -> list[str]:
    """POSIX relative paths of every entry under ``folder`` (sorted) except the manifest and signature.

    Raises BundleUnsignedFileError for a symlink or a special file (never followed, never trusted).
    """
    names: list[str] = []

    def unreadable(exc: OSError) -> None:
        raise BundleTamperedError(f"{folder}: cannot list {exc.filename} ({exc.strerror})") from exc

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=False):
        root_path = Path(root)
        for name in sorted(dirs):
            entry = root_path / name
            if entry.is_symlink():
                rel = entry.relative_to(folder).as_posix()
                raise BundleUnsignedFileError(f"{folder}: {rel!r} is a symlink; bundles must not hold links")
        for name in files:
            entry = root_path / name
            rel = entry.relative_to(folder).as_posix()
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleUnsignedFileError(f"{folder}: {rel!r} is a symlink; bundles must not hold links")
            if not stat.S_ISREG(mode):
                raise BundleUnsignedFileError(f"{folder}: {rel!r} is not a regular file")
            if rel not in _RESERVED:
                names.append(rel)
    return sorted(names)


def manifest_digests(folder: str | Path) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of every regular file under ``folder`` except ``manifest.json``/``manifest.sig``.

    Parameters
    ----------
    folder:
        The bundle folder (walked recursively; keys are sorted POSIX relative paths).

    Returns
    -------
    dict
        ``{relative_name: {"sha256": hex, "bytes": int}}``.

    Raises
    ------
    BundleUnsignedFileError
        If the folder holds a symlink or a special file.
    """
    folder = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    for rel in _walk_bundle(folder):
        sha, size = _file_digest(folder / rel)
        out[rel] = {"sha256": sha, "bytes": size}
    return out


def write_manifest_files(folder: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``manifest["files"]`` from the folder's content and write ``manifest.json`` atomically.

    Parameters
    ----------
    folder:
        The bundle folder, with every payload file already written.
    manifest:
        The manifest's other metadata (``format``, ``bundle_version``, ...); updated in place.

    Returns
    -------
    dict
        The completed manifest (the same object).
    """
    folder = Path(folder)
    manifest["files"] = manifest_digests(folder)
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _safe_relative(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise BundleTamperedError(f"manifest lists an invalid file name {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleTamperedError(f"manifest lists a file outside the bundle: {name!r}")
    if name in _RESERVED:
        raise BundleTamperedError(f"manifest lists its own reserved file {name!r}")
    return name


def _check_manifest_shape(manifest: dict[str, Any], where: Path) -> dict[str, dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleTamperedError(f"{where}: the manifest has no 'files' table")
    version = manifest.get("bundle_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleTamperedError(f"{where}: the manifest's 'bundle_version' must be an integer")
    for name, entry in files.items():
        _safe_relative(name)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise BundleTamperedError(f"{where}: manifest entry for {name!r} needs 'sha256' and 'bytes'")
    return files


# --- sign and verify ---------------------------------------------------------------------------
def sign_bundle(folder: str | Path, private_key: Ed25519PrivateKey) -> Path:
    """Sign ``folder/manifest.json`` and write ``folder/manifest.sig`` atomically.

    The folder is checked against its manifest first, so a publisher never signs a manifest that
    does not describe the files next to it.

    Parameters
    ----------
    folder:
        A bundle folder with a complete ``manifest.json`` (see :func:`write_manifest_files`).
    private_key:
        The publisher's Ed25519 key.

    Returns
    -------
    Path
        The path of ``manifest.sig``.

    Raises
    ------
    BundleError
        If the manifest is unreadable or does not match the folder (tampered / unlisted files).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    _check_files(folder, _check_manifest_shape(manifest, folder))
    signature = private_key.sign(canonical_manifest_bytes(manifest))
    record = {
        "alg": SIGNATURE_ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return atomic_write_text(folder / SIGNATURE_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _check_signature(folder: Path, trusted_public_key: Ed25519PublicKey) -> dict[str, Any]:
    sig_path, manifest_path = folder / SIGNATURE_NAME, folder / MANIFEST_NAME
    blobs: dict[Path, bytes] = {}
    for path, limit, what in (
        (sig_path, MAX_SIGNATURE_BYTES, "signature"),
        (manifest_path, MAX_MANIFEST_BYTES, "manifest"),
    ):
        try:  # bounded reads: an oversized file is refused before it is parsed (or fully read)
            blobs[path] = read_bounded(path, limit, BundleSignatureError, what)
        except FileNotFoundError as exc:
            raise BundleSignatureError(f"{path}: missing; the bundle is not signed") from exc
    record = parse_untrusted_json(
        blobs[sig_path], where=str(sig_path), error=BundleSignatureError, max_bytes=MAX_SIGNATURE_BYTES,
        max_depth=2, what="signature record",
    )  # fmt: skip
    try:
        alg, signed_by, encoded = record["alg"], record["key_id"], record["signature"]
        signature = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleSignatureError(f"{sig_path}: unreadable signature record ({exc})") from exc
    if alg != SIGNATURE_ALGORITHM:
        raise BundleSignatureError(f"{sig_path}: algorithm {alg!r} is not {SIGNATURE_ALGORITHM!r}")
    trusted_id = key_id(trusted_public_key)
    if signed_by != trusted_id:
        raise BundleSignatureError(
            f"{folder}: signed by key {signed_by}, but the trusted key is {trusted_id}; "
            "install the publisher's public key or fetch a bundle from the trusted publisher"
        )
    manifest = _parse_manifest(blobs[manifest_path], str(manifest_path), BundleSignatureError)
    try:
        trusted_public_key.verify(signature, canonical_manifest_bytes(manifest))
    except InvalidSignature as exc:
        raise BundleSignatureError(
            f"{folder}: the signature does not match manifest.json (the manifest was altered, "
            "or it was not signed by the trusted key)"
        ) from exc
    return manifest


def _check_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    for name in sorted(files):
        entry, path = files[name], folder / name
        try:
            info = path.lstat()
        except FileNotFoundError as exc:
            raise BundleTamperedError(f"{folder}: listed file {name!r} is missing") from exc
        if not stat.S_ISREG(info.st_mode):
            raise BundleTamperedError(f"{folder}: listed file {name!r} is not a regular file")
        if info.st_size != entry["bytes"]:
            raise BundleTamperedError(
                f"{folder}: {name!r} has {info.st_size} bytes, the manifest says {entry['bytes']}"
            )
        sha, _ = _file_digest(path)
        if sha != entry["sha256"]:
            raise BundleTamperedError(f"{folder}: {name!r} does not match its SHA-256 in the manifest")
    for rel in _walk_bundle(folder):
        if rel not in files:
            raise BundleUnsignedFileError(f"{folder}: {rel!r} is not listed in the signed manifest")


def verify_bundle(
    folder: str | Path,
    trusted_public_key: Ed25519PublicKey,
    *,
    min_version: int | None = None,
    current_digest: str | None = None,
) -> dict[str, Any]:
    """Verify a bundle folder and return its (now trusted) manifest.

    Checks, in order: signature over the canonical manifest; every listed file present with its
    size and SHA-256; no unlisted file, symlink or special file; version not older than
    ``min_version`` (and, at an equal version, the same content as ``current_digest``).
    Load the bundle's files through the returned manifest, not by re-reading ``manifest.json``.

    Parameters
    ----------
    folder:
        The candidate bundle folder.
    trusted_public_key:
        The publisher's Ed25519 public key.
    min_version:
        The version already installed, if any (rollback protection).
    current_digest:
        :func:`bundle_digest` of the installed manifest; with ``min_version``, an equal version
        is accepted only if the digest is identical.

    Returns
    -------
    dict
        The verified manifest.

    Raises
    ------
    BundleSignatureError, BundleTamperedError, BundleUnsignedFileError, BundleRollbackError
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleTamperedError(f"{folder}: not a bundle folder")
    manifest = _check_signature(folder, trusted_public_key)
    _check_files(folder, _check_manifest_shape(manifest, folder))
    version = int(manifest["bundle_version"])
    if min_version is not None:
        if version < min_version:
            raise BundleRollbackError(
                f"{folder}: bundle_version {version} is older than the installed version {min_version}"
            )
        if (
            version == min_version
            and current_digest is not None
            and bundle_digest(manifest) != current_digest
        ):
            raise BundleRollbackError(
                f"{folder}: bundle_version {version} equals the installed version but its content differs; "
                "a new release must carry a higher bundle_version"
            )
    return manifest


# --- device cache ------------------------------------------------------------------------------
BundleValidator = Callable[[Path, dict[str, Any]], object]
"""``validate(folder, verified_manifest)``: a full check run on the staged copy before it becomes
current (e.g. :func:`pft.core.bundle.load_bundle`); raising refuses the install."""


@dataclass(frozen=True)
class InstalledBundle:
    """An installed bundle: its digest (the folder's name), version and folder."""

    digest: str
    bundle_version: int
    path: Path


@dataclass(frozen=True)
class _Altered:
    """A digest-named folder in the cache whose signed manifest no longer verifies."""

    digest: str
    claimed_version: int | None  # what its (unverified) manifest says, when it says anything
    reason: str


class TrustedBundleCache:
    """The bundles a device trusts, one folder per digest; the current one is DERIVED from them.

    There is no install pointer to edit or delete: the current bundle is the installed folder with
    the highest ``bundle_version`` whose signed manifest verifies (and whose digest is its name),
    so rollback protection rests on signed data only. A candidate is verified (signature, files,
    not older than anything installed), copied to a temporary folder, verified again there,
    checked by ``validator`` (the full load a device will do: shapes, dtypes, finite values,
    config), and only then renamed to ``<cache_root>/<digest>/``, which makes it current. If any
    step fails the typed error is raised and the previous bundle stays current and loadable. One
    writer per cache root.

    Parameters
    ----------
    cache_root:
        Folder of the cache (created if missing).
    trusted_public_key:
        The publisher's Ed25519 key.
    keep:
        How many installed bundles to keep (current included, at least 1).
    validator:
        Run on the staged copy before it becomes current; see :data:`BundleValidator`.
    """

    def __init__(
        self,
        cache_root: str | Path,
        trusted_public_key: Ed25519PublicKey,
        *,
        keep: int = 2,
        validator: BundleValidator | None = None,
    ) -> None:
        self.cache_root = Path(cache_root)
        self.trusted_public_key = trusted_public_key
        self.keep = max(1, keep)
        self.validator = validator

    # reading ---------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[InstalledBundle], list[_Altered]]:
        """The installed folders whose signed manifest verifies, and those that no longer do."""
        verified: list[InstalledBundle] = []
        altered: list[_Altered] = []
        if not self.cache_root.is_dir():
            return verified, altered
        for entry in sorted(self.cache_root.iterdir()):
            if not _is_digest(entry.name):
                continue
            try:
                if entry.is_symlink() or not entry.is_dir():
                    raise BundleTamperedError(f"{entry}: not a plain folder")
                manifest = _check_signature(entry, self.trusted_public_key)
                version = manifest.get("bundle_version")
                if not isinstance(version, int) or isinstance(version, bool):
                    raise BundleTamperedError(f"{entry}: no integer bundle_version")
                if bundle_digest(manifest) != entry.name:
                    raise BundleTamperedError(
                        f"{entry}: its manifest is not the one installed under this name"
                    )
            except BundleError as exc:
                altered.append(_Altered(entry.name, _claimed_version(entry), str(exc)))
                continue
            verified.append(InstalledBundle(digest=entry.name, bundle_version=version, path=entry))
        return verified, altered

    def installed(self) -> InstalledBundle | None:
        """The current bundle (highest verified version), or None if nothing was installed yet.

        Only the signed manifests are checked here (cheap); :meth:`load_current` verifies files.

        Raises
        ------
        BundleTamperedError
            An installed folder that is (or may be) the newest no longer verifies: someone altered
            the cache on this device. Installing that version (or a newer one) again repairs it.
        """
        verified, altered = self._scan()
        newest = max(verified, key=lambda b: b.bundle_version, default=None)
        for bad in altered:
            if newest is None or bad.claimed_version is None or bad.claimed_version >= newest.bundle_version:
                raise BundleTamperedError(
                    f"{self.cache_root}: installed bundle {bad.digest[:16]} no longer verifies "
                    f"({bad.reason}); it was altered on this device - install the current release again"
                )
            logger.warning(
                "%s: an older installed bundle no longer verifies (%s)", self.cache_root, bad.reason
            )
        if newest is not None and sum(b.bundle_version == newest.bundle_version for b in verified) > 1:
            raise BundleTamperedError(
                f"{self.cache_root}: two installed bundles claim version {newest.bundle_version}"
            )
        return newest

    def current(self) -> Path | None:
        """The folder of the current bundle (files not re-verified; see :meth:`load_current`), or None."""
        record = self.installed()
        return record.path if record is not None else None

    def load_current(self) -> tuple[Path, dict[str, Any]]:
        """Verify the current bundle again (signature and every file) and return its folder and manifest.

        Raises
        ------
        BundleError
            If nothing is installed, or the installed copy no longer verifies.
        """
        record = self.installed()
        if record is None:
            raise BundleError(f"{self.cache_root}: no bundle installed yet")
        manifest = verify_bundle(record.path, self.trusted_public_key)
        if bundle_digest(manifest) != record.digest:
            raise BundleTamperedError(f"{record.path}: content does not match its installed digest")
        return record.path, manifest

    def _floor(self) -> tuple[int | None, str | None]:
        """The rollback floor: the highest version installed (verified, or claimed by an altered
        folder), and the digest that version was installed under."""
        verified, altered = self._scan()
        best: tuple[int, str] | None = None
        for version, digest in [(b.bundle_version, b.digest) for b in verified] + [
            (a.claimed_version, a.digest) for a in altered if a.claimed_version is not None
        ]:
            if best is None or version > best[0]:
                best = (version, digest)
        return (best[0], best[1]) if best is not None else (None, None)

    # installing ------------------------------------------------------------------------------
    def install(self, candidate_folder: str | Path) -> Path:
        """Verify, validate and install a candidate bundle, making it current.

        Parameters
        ----------
        candidate_folder:
            The received bundle folder (left untouched).

        Returns
        -------
        Path
            The installed folder ``<cache_root>/<digest>/``.

        Raises
        ------
        BundleSignatureError, BundleTamperedError, BundleUnsignedFileError, BundleRollbackError
            The candidate was refused; the current bundle is unchanged.
        Exception
            Whatever the ``validator`` raises (e.g. ``UnsafeWeightsError``, ``BundleError``); the
            current bundle is unchanged.
        """
        candidate = Path(candidate_folder)
        self.cache_root.mkdir(parents=True, exist_ok=True)
        min_version, floor_digest = self._floor()
        manifest = verify_bundle(
            candidate, self.trusted_public_key, min_version=min_version, current_digest=floor_digest
        )
        digest = bundle_digest(manifest)
        target = self.cache_root / digest
        if target.is_dir() and not target.is_symlink():
            try:  # the same bundle again: nothing to do if the installed copy is intact
                if verify_bundle(target, self.trusted_public_key) == manifest:
                    return target
            except BundleError as exc:
                logger.warning("%s: reinstalling an altered copy (%s)", target, exc)

        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.cache_root))
        try:
            for name in [*sorted(manifest["files"]), MANIFEST_NAME, SIGNATURE_NAME]:
                _copy_durably(candidate / name, staging / name)
            # The candidate may have changed after the first check: verify the copy we will keep.
            copied = verify_bundle(
                staging, self.trusted_public_key, min_version=min_version, current_digest=floor_digest
            )
            if bundle_digest(copied) != digest:
                raise BundleTamperedError(f"{candidate}: the bundle changed while it was being installed")
            if self.validator is not None:  # the full load, BEFORE the bundle can become current
                self.validator(staging, copied)
            if target.exists() or target.is_symlink():  # an altered copy, or an interrupted install
                trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.cache_root))
                os.replace(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, target)
            fsync_directory(self.cache_root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("installed bundle version %s (%s)", manifest["bundle_version"], digest[:16])
        self._prune(current=digest)
        return target

    def _prune(self, current: str) -> None:
        """Keep the current bundle and the next ``keep - 1`` newest verified ones; remove the rest
        (older or altered bundles, leftovers of interrupted installs, the legacy pointer file)."""
        verified, _ = self._scan()
        older = sorted((b for b in verified if b.digest != current), key=lambda b: -b.bundle_version)
        keep = {current, *(b.digest for b in older[: self.keep - 1])}
        for entry in self.cache_root.iterdir():
            if entry.name in keep:
                continue
            ours = _is_digest(entry.name) or entry.name.startswith((".incoming-", ".trash-"))
            if ours and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name == _LEGACY_POINTER or (
                entry.name.startswith(f".{_LEGACY_POINTER}.") and entry.name.endswith(".tmp")
            ):
                with contextlib.suppress(OSError):
                    entry.unlink()


_LEGACY_POINTER = "current.json"  # written by earlier releases; never read, removed on install


def _claimed_version(folder: Path) -> int | None:
    """The ``bundle_version`` an (unverified) manifest claims, if it can be read at all."""
    try:
        version = read_manifest(folder).get("bundle_version")
    except BundleError:
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _is_digest(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _copy_durably(source: Path, destination: Path) -> None:
    """Copy one regular file (never following a link) and fsync it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        raise BundleTamperedError(f"{source}: cannot be read for installation ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as src, destination.open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
