"""The on-device encrypted store: a user's personal state (translator, privacy ledger) at rest.

One store is one file. Its plaintext is a pickle-free container (a JSON tree plus one safetensors
blob for every tensor in it), encrypted with AES-256-GCM under a key that comes either from a
passphrase (scrypt, random per-store salt in the file header) or from the platform keystore
(32 raw bytes, expanded per file with HKDF). The associated data binds the owner id, the store
format version, the purpose (default: the file name) and the whole header, so a ciphertext moved
to another user, another purpose or another header fails authentication (docs/reliability.md case 4).

Every save is atomic (temp file, fsync, rename; docs/reliability.md case 5) and first keeps the
previous good generation as ``<name>.prev``; :meth:`EncryptedStore.read` falls back to it, and
says so, when the current file fails to authenticate.

File layout (all integers little-endian)::

    magic "PFTSTORE" | version u8 | kdf u8 | scrypt log2(n) u8 | r u8 | p u8 | salt 16 | nonce 12 |
    key check 8 | AES-GCM ciphertext + 16-byte tag
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pft.core.atomic import atomic_write_bytes
from pft.core.errors import StoreAuthenticationError, StoreError, UnsafeWeightsError
from pft.core.safe_weights import load_safetensors_bytes, safetensors_bytes

try:  # POSIX: one writer at a time per store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["STORE_FORMAT", "EncryptedStore", "StoreKey", "StoreRead", "generate_key_file"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "pft-store/1"
_MAGIC = b"PFTSTORE"
_VERSION = 1
_KDF_RAW, _KDF_SCRYPT = 0, 1
_HEADER = struct.Struct("<8sBBBBB16s12s8s")
_CONTAINER_MAGIC = b"PFTC"
_TAG_TENSOR, _TAG_BYTES = "__pft_tensor__", "__pft_bytes__"
# Refuse KDF parameters from a (possibly tampered) header that would exhaust a phone.
_MAX_LOG2_N, _MAX_R, _MAX_P = 20, 32, 16


class _WrongKeyError(StoreAuthenticationError):
    """The key check in the header does not match the given key."""


# --- keys --------------------------------------------------------------------------------------
class StoreKey:
    """Where a store's key comes from: a passphrase (scrypt) or 32 raw bytes (platform keystore).

    Build one with :meth:`from_passphrase`, :meth:`from_bytes` or :meth:`from_file`; the key of
    each file is derived from it and the salt in that file's header.
    """

    def __init__(
        self,
        *,
        secret: bytes,
        kdf: int,
        log2_n: int = 0,
        r: int = 0,
        p: int = 0,
        salt: bytes | None = None,
    ) -> None:
        self._secret = secret
        self.kdf = kdf
        self.log2_n, self.r, self.p = log2_n, r, p
        self.fixed_salt = salt
        self._derived: dict[tuple[bytes, int, int, int], bytes] = {}

    @classmethod
    def from_passphrase(
        cls, passphrase: str, salt: bytes | None = None, *, n: int = 2**15, r: int = 8, p: int = 1
    ) -> StoreKey:
        """A key derived from a passphrase with scrypt.

        Parameters
        ----------
        passphrase:
            The user's passphrase (non-empty).
        salt:
            Normally None: each store draws a random 16-byte salt on its first save and keeps it
            in its header. Give 16 bytes only to pin the salt.
        n, r, p:
            scrypt cost parameters (``n`` a power of two); defaults n=2**15, r=8, p=1.
        """
        if not passphrase:
            raise StoreError("the store passphrase must not be empty")
        if n < 2 or n & (n - 1):
            raise StoreError(f"scrypt n must be a power of two, got {n}")
        if salt is not None and len(salt) != 16:
            raise StoreError("the scrypt salt must be 16 bytes")
        return cls(
            secret=passphrase.encode("utf-8"), kdf=_KDF_SCRYPT, log2_n=n.bit_length() - 1, r=r, p=p, salt=salt
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> StoreKey:
        """A key supplied by the platform keystore: exactly 32 random bytes."""
        if len(raw) != 32:
            raise StoreError(f"a raw store key must be 32 bytes, got {len(raw)}")
        return cls(secret=bytes(raw), kdf=_KDF_RAW)

    @classmethod
    def from_file(cls, path: str | Path) -> StoreKey:
        """Read a raw key file: 32 bytes, or 64 hex digits (see :func:`generate_key_file`)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the store key ({exc.strerror})") from exc
        if path.stat().st_mode & 0o077:
            logger.warning("%s: the store key file is readable by other users; chmod 600 it", path)
        if len(data) != 32:
            try:
                data = bytes.fromhex(data.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as exc:
                raise StoreError(f"{path}: a key file holds 32 raw bytes or 64 hex digits") from exc
        return cls.from_bytes(data)

    @property
    def is_passphrase(self) -> bool:
        """Whether this key is a passphrase (scrypt) rather than raw key material."""
        return self.kdf == _KDF_SCRYPT

    def derive(self, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
        """The 32-byte AES key of a file with this salt (and, for passphrases, these scrypt costs)."""
        cache_key = (salt, log2_n, r, p)
        if cache_key not in self._derived:
            if self.kdf == _KDF_SCRYPT:
                key = Scrypt(salt=salt, length=32, n=2**log2_n, r=r, p=p).derive(self._secret)
            else:
                key = HKDF(
                    algorithm=hashes.SHA256(), length=32, salt=salt, info=STORE_FORMAT.encode()
                ).derive(self._secret)
            self._derived[cache_key] = key
        return self._derived[cache_key]

    def __repr__(self) -> str:  # never print key material
        kind = "passphrase" if self.is_passphrase else "raw"
        return f"StoreKey({kind})"


def generate_key_file(path: str | Path) -> Path:
    """Write 32 random bytes as a raw store key (mode 0600), for devices without a keystore API."""
    path = atomic_write_bytes(path, secrets.token_bytes(32))
    os.chmod(path, 0o600)
    return path


# --- the pickle-free container -----------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value
        return {_TAG_TENSOR: name}
    if isinstance(value, bytes | bytearray):
        return {_TAG_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{where}: dict keys must be strings, got {key!r}")
            if key in (_TAG_TENSOR, _TAG_BYTES):
                raise StoreError(f"{where}: the key {key!r} is reserved by the store")
            out[key] = _encode(item, tensors, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_encode(item, tensors, f"{where}[{i}]") for i, item in enumerate(value)]
    raise StoreError(f"{where}: cannot store a {type(value).__name__} (tensors, bytes and JSON values only)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TAG_TENSOR}:
            return tensors[value[_TAG_TENSOR]]
        if set(value) == {_TAG_BYTES}:
            return base64.b64decode(value[_TAG_BYTES], validate=True)
        return {key: _decode(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    return value


def pack_payload(payload: dict[str, Any]) -> bytes:
    """Serialise a payload without pickle: magic, JSON length (u64), JSON tree, safetensors blob."""
    if not isinstance(payload, dict):
        raise StoreError("a store payload must be a dict")
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(payload, tensors, "payload")
    text = json.dumps({"format": STORE_FORMAT, "tree": tree}, sort_keys=True).encode("utf-8")
    return _CONTAINER_MAGIC + struct.pack("<Q", len(text)) + text + safetensors_bytes(tensors)


def unpack_payload(data: bytes, where: str) -> dict[str, Any]:
    """Inverse of :func:`pack_payload`; refuses anything that is not that container."""
    try:
        if data[:4] != _CONTAINER_MAGIC:
            raise ValueError("bad container magic")
        (size,) = struct.unpack("<Q", data[4:12])
        document = json.loads(data[12 : 12 + size].decode("utf-8"))
        tensors = load_safetensors_bytes(data[12 + size :], where)
        payload = _decode(document["tree"], tensors)
        if document.get("format") != STORE_FORMAT or not isinstance(payload, dict):
            raise ValueError("unknown container format")
    except (ValueError, KeyError, TypeError, struct.error, UnsafeWeightsError) as exc:
        raise StoreError(f"{where}: decrypted, but the content is not a store container ({exc})") from exc
    return payload


# --- the store ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreRead:
    """What :meth:`EncryptedStore.read` found.

    Attributes
    ----------
    payload:
        The decrypted content.
    recovered_from_backup:
        True when the current file failed and ``<name>.prev`` (the last good copy) was used.
    source:
        The file the payload came from.
    failure:
        Why the current file was not used (None when it was).
    """

    payload: dict[str, Any]
    recovered_from_backup: bool
    source: Path
    failure: str | None = None


class EncryptedStore:
    """An authenticated, encrypted, crash-safe file holding one user's personal state.

    Parameters
    ----------
    path:
        The store file; ``<path>.prev`` holds the previous good generation.
    key:
        The key source (:class:`StoreKey`).
    purpose:
        What the file is for, bound into the authenticated data; defaults to the file name, so
        a ciphertext renamed to another store of the same owner fails too.

    Notes
    -----
    One writer per store (an advisory lock on ``<path>.lock`` enforces it between processes).
    """

    def __init__(self, path: str | Path, key: StoreKey, *, purpose: str | None = None) -> None:
        self.path = Path(path)
        self.key = key
        self.purpose = purpose if purpose is not None else self.path.name
        self._salt: bytes | None = key.fixed_salt

    @property
    def backup_path(self) -> Path:
        """The previous good generation, ``<name>.prev``."""
        return self.path.with_name(self.path.name + ".prev")

    def exists(self) -> bool:
        """Whether a current or previous generation is on disk."""
        return self.path.exists() or self.backup_path.exists()

    # encryption ------------------------------------------------------------------------------
    def _aad(self, owner: str, header: bytes) -> bytes:
        binding = json.dumps(
            {"format": STORE_FORMAT, "owner": owner, "purpose": self.purpose}, sort_keys=True
        )
        return binding.encode("utf-8") + header

    def _key_check(self, key: bytes) -> bytes:
        return hmac.new(key, b"pft-store key check", hashlib.sha256).digest()[:8]

    def _seal(self, plaintext: bytes, owner: str) -> bytes:
        salt = self._salt or secrets.token_bytes(16)
        self._salt = salt
        log2_n, r, p = self.key.log2_n, self.key.r, self.key.p
        key = self.key.derive(salt, log2_n, r, p)
        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(_MAGIC, _VERSION, self.key.kdf, log2_n, r, p, salt, nonce, self._key_check(key))
        return header + AESGCM(key).encrypt(nonce, plaintext, self._aad(owner, header))

    def _open(self, blob: bytes, owner: str, path: Path) -> dict[str, Any]:
        if len(blob) < _HEADER.size + 16:
            raise StoreAuthenticationError(f"{path}: too short to be a store file (corrupted or truncated)")
        header = blob[: _HEADER.size]
        magic, version, kdf, log2_n, r, p, salt, nonce, check = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise StoreAuthenticationError(f"{path}: not a PFT store file (corrupted, or another file)")
        if version != _VERSION:
            raise StoreAuthenticationError(f"{path}: store format version {version} is not supported")
        if kdf != self.key.kdf:
            wanted = "a passphrase" if kdf == _KDF_SCRYPT else "a raw key"
            raise StoreAuthenticationError(
                f"{path}: this store is protected by {wanted}; the wrong kind was given"
            )
        if kdf == _KDF_SCRYPT and not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            raise StoreAuthenticationError(f"{path}: implausible scrypt parameters in the header (corrupted)")
        key = self.key.derive(salt, log2_n, r, p)
        if not hmac.compare_digest(check, self._key_check(key)):
            raise _WrongKeyError(
                f"{path}: wrong passphrase or key for this store (or its header is corrupted)"
            )
        try:
            plaintext = AESGCM(key).decrypt(nonce, blob[_HEADER.size :], self._aad(owner, header))
        except InvalidTag as exc:
            raise StoreAuthenticationError(
                f"{path}: authentication failed - the file is corrupted, or it belongs to another "
                f"owner or purpose than {owner!r}/{self.purpose!r}"
            ) from exc
        self._salt = salt
        return unpack_payload(plaintext, str(path))

    def _backup_opens(self, owner: str) -> bool:
        try:
            self._read_one(self.backup_path, owner)
        except (StoreError, FileNotFoundError):
            return False
        return True

    def _read_one(self, path: Path, owner: str) -> tuple[dict[str, Any], bytes]:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the store ({exc.strerror})") from exc
        return self._open(blob, owner, path), blob

    # public API ------------------------------------------------------------------------------
    def save(self, payload: dict[str, Any], *, owner: str) -> Path:
        """Encrypt and write ``payload`` atomically, keeping the previous good generation.

        Parameters
        ----------
        payload:
            ``str`` keys; values are tensors, bytes, str, int, float, bool, None, or dicts/lists of
            these (tuples come back as lists). No pickle is involved.
        owner:
            The user id the ciphertext is bound to.

        Returns
        -------
        Path
            The store path.

        Raises
        ------
        StoreError
            If the payload holds a value that cannot be stored.
        """
        _check_owner(owner)
        plaintext = pack_payload(payload)
        with self._lock():
            self._remove_stale_temporaries()
            current: bytes | None = None
            if self.path.exists():
                try:  # reading it also adopts the store's salt (one scrypt per store and process)
                    _, current = self._read_one(self.path, owner)
                except (StoreError, FileNotFoundError) as exc:
                    # Never let a bad current file overwrite the last good copy, and never let a
                    # mistyped passphrase replace a store it cannot open.
                    if isinstance(exc, _WrongKeyError) and not self._backup_opens(owner):
                        raise StoreAuthenticationError(f"{exc}; refusing to overwrite it") from exc
                    logger.warning("%s: not kept as backup, it does not authenticate (%s)", self.path, exc)
            if current is not None:
                atomic_write_bytes(self.backup_path, current)
            atomic_write_bytes(self.path, self._seal(plaintext, owner))
        return self.path

    def read(self, *, owner: str) -> StoreRead:
        """Decrypt the store, falling back to ``<name>.prev`` if the current file fails.

        Raises
        ------
        StoreAuthenticationError
            If neither generation authenticates (message says why for the current file).
        StoreError
            If no generation exists.
        """
        _check_owner(owner)
        try:
            payload, _ = self._read_one(self.path, owner)
            return StoreRead(payload=payload, recovered_from_backup=False, source=self.path)
        except FileNotFoundError:
            failure = f"{self.path}: missing"
        except StoreError as exc:
            failure = str(exc)
        try:
            payload, _ = self._read_one(self.backup_path, owner)
        except FileNotFoundError:
            if failure.endswith("missing"):
                raise StoreError(f"{self.path}: no store here yet (nothing saved for this user)") from None
            raise StoreAuthenticationError(f"{failure}; no previous copy to fall back to") from None
        except StoreError as exc:
            raise StoreAuthenticationError(f"{failure}; the previous copy failed too: {exc}") from exc
        logger.warning("%s; loaded the last good copy %s", failure, self.backup_path)
        return StoreRead(
            payload=payload, recovered_from_backup=True, source=self.backup_path, failure=failure
        )

    def load(self, *, owner: str) -> dict[str, Any]:
        """The decrypted payload (see :meth:`read`, which also says whether the backup was used)."""
        return self.read(owner=owner).payload

    # housekeeping ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _remove_stale_temporaries(self) -> None:
        """Delete temp files left by a writer killed mid-save (we hold the lock: none is live)."""
        for name in (self.path.name, self.backup_path.name):
            for stale in self.path.parent.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise StoreError("owner must be a non-empty user id")
