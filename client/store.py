"""The on-device encrypted store: a user's personal state (translator, privacy ledger) at rest.

One store is one file (plus its backup generation). Its plaintext is a pickle-free container (a
JSON tree plus one safetensors blob for every tensor in it), encrypted with AES-256-GCM under a
key that comes either from a passphrase (scrypt, random per-store salt in the file header) or
from the platform keystore (32 raw bytes, expanded per file with HKDF). The associated data binds
the owner id, the store format, the purpose (default: the file name) and the whole header, which
carries a monotonic generation counter, so a ciphertext moved to another user or purpose, or an
older generation copied over the current one, fails (docs/reliability.md case 4).

Every save is atomic (temp file, fsync, rename; case 5) and, under one lock:

- refuses to replace any generation the given key and owner do not open: a mistyped passphrase
  or owner can never destroy the generation the right key opens (the header's key check and
  binding check tell "another key/owner" apart from "damaged");
- writes the next counter (one more than any generation or the ``<name>.counter`` high-water
  mark), so a reader can refuse a generation older than the newest it knows of.

Two layouts of the second copy: ``backup="previous"`` (default) keeps the previous good
generation as ``<name>.prev`` and :meth:`EncryptedStore.read` falls back to it (one generation
lost, said so) when the current one fails; ``backup="mirror"`` writes every new generation to
``<name>.copy`` first and then to ``<name>``, and reads the newest copy that authenticates, so a
single damaged or torn copy loses nothing (the privacy ledger, which must never go back).

File layout (all integers little-endian)::

    magic "PFTSTORE" | version u8 (2) | kdf u8 | scrypt log2(n) u8 | r u8 | p u8 | salt 16 |
    nonce 12 | key check 8 | binding check 8 | generation u64 | AES-GCM ciphertext + 16-byte tag
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from filelock import FileLock

from pft.core.atomic import atomic_write_bytes
from pft.core.errors import StoreAuthenticationError, StoreError, StoreRollbackError, UnsafeWeightsError
from pft.core.safe_weights import load_safetensors_bytes, safetensors_bytes
from pft.core.untrusted_json import parse_untrusted_json

__all__ = ["STORE_FORMAT", "BackupMode", "EncryptedStore", "StoreKey", "StoreRead", "generate_key_file"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "pft-store/2"
_MAGIC = b"PFTSTORE"
_VERSION = 2
_KDF_RAW, _KDF_SCRYPT = 0, 1
_HEADER = struct.Struct("<8sBBBBB16s12s8s8sQ")
#: Largest JSON tree a decrypted container may hold, and its nesting (a payload needs about 6).
_MAX_TREE_BYTES, _MAX_TREE_DEPTH = 64 << 20, 32
BackupMode = Literal["previous", "mirror"]
_CONTAINER_MAGIC = b"PFTC"
_TAG_TENSOR, _TAG_BYTES = "__pft_tensor__", "__pft_bytes__"
# Refuse KDF parameters from a (possibly tampered) header that would exhaust a phone.
_MAX_LOG2_N, _MAX_R, _MAX_P = 20, 32, 16


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


def generate_key_file(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write 32 random bytes as a raw store key (mode 0600), for devices without a keystore API.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false: replacing a store key orphans every store it
        encrypts, so it is never done silently.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to replace a store key (every store encrypted with it "
            "would become unreadable) - pass overwrite/--force only if no store uses it"
        )
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
        if size > _MAX_TREE_BYTES or 12 + size > len(data):
            raise ValueError(f"declared tree of {size} bytes")
        document = parse_untrusted_json(
            data[12 : 12 + size], where=where, error=StoreError, max_bytes=_MAX_TREE_BYTES,
            max_depth=_MAX_TREE_DEPTH, what="store tree",
        )  # fmt: skip
        tensors = load_safetensors_bytes(data[12 + size :], where)
        payload = _decode(document["tree"], tensors)
        if document.get("format") != STORE_FORMAT or not isinstance(payload, dict):
            raise ValueError("unknown container format")
    except (ValueError, KeyError, TypeError, struct.error, UnsafeWeightsError, StoreError) as exc:
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
        True when the payload did not come from the main file (it failed, or, with
        ``backup="mirror"``, its copy is newer after an interrupted write).
    source:
        The file the payload came from.
    failure:
        Why the main file was not used (None when it was).
    generation:
        The generation counter of what was read.
    """

    payload: dict[str, Any]
    recovered_from_backup: bool
    source: Path
    failure: str | None = None
    generation: int = 0


_Kind = Literal["absent", "ours", "foreign", "garbage"]


@dataclass(frozen=True)
class _Generation:
    """One file of the store, as this key and owner see it.

    ``ours``: it opens with this key and owner; ``foreign``: its header says another key, owner or
    purpose wrote it (it may be the person's real state: never overwrite it); ``garbage``: no key
    can open it (truncated, bad magic, or this key's own file with damaged ciphertext).
    """

    path: Path
    kind: _Kind
    reason: str = ""
    counter: int = 0
    blob: bytes = b""
    plaintext: bytes = b""


class EncryptedStore:
    """An authenticated, encrypted, crash-safe file holding one user's personal state.

    Parameters
    ----------
    path:
        The store file.
    key:
        The key source (:class:`StoreKey`).
    purpose:
        What the file is for, bound into the authenticated data; defaults to the file name, so
        a ciphertext renamed to another store of the same owner fails too.
    backup:
        ``"previous"``: ``<path>.prev`` keeps the previous good generation (a damaged current file
        costs one generation). ``"mirror"``: ``<path>.copy`` holds the same generation, written
        first (a damaged or torn copy costs nothing).

    Notes
    -----
    One writer at a time (a lock on ``<path>.lock``, between threads and processes);
    ``<path>.counter`` holds the newest generation written (the rollback high-water mark).
    """

    def __init__(
        self,
        path: str | Path,
        key: StoreKey,
        *,
        purpose: str | None = None,
        backup: BackupMode = "previous",
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.purpose = purpose if purpose is not None else self.path.name
        self.backup = backup
        self._salt: bytes | None = key.fixed_salt
        self._file_lock = FileLock(self.path.with_name(self.path.name + ".lock"), mode=0o600)

    @property
    def backup_path(self) -> Path:
        """The second copy: ``<name>.prev`` (previous generation) or ``<name>.copy`` (mirror)."""
        suffix = ".prev" if self.backup == "previous" else ".copy"
        return self.path.with_name(self.path.name + suffix)

    @property
    def counter_path(self) -> Path:
        """``<name>.counter``: the newest generation number written."""
        return self.path.with_name(self.path.name + ".counter")

    def exists(self) -> bool:
        """Whether any generation of this store is on disk."""
        return self.path.exists() or self.backup_path.exists() or self.counter_path.exists()

    # encryption ------------------------------------------------------------------------------
    def _binding(self, owner: str) -> bytes:
        return json.dumps(
            {"format": STORE_FORMAT, "owner": owner, "purpose": self.purpose}, sort_keys=True
        ).encode("utf-8")

    def _aad(self, owner: str, header: bytes) -> bytes:
        return self._binding(owner) + header

    def _key_check(self, key: bytes) -> bytes:
        return hmac.new(key, b"pft-store key check", hashlib.sha256).digest()[:8]

    def _binding_check(self, key: bytes, owner: str) -> bytes:
        return hmac.new(key, b"pft-store binding check" + self._binding(owner), hashlib.sha256).digest()[:8]

    def _seal(self, plaintext: bytes, owner: str, counter: int) -> bytes:
        salt = self._salt or secrets.token_bytes(16)
        self._salt = salt
        log2_n, r, p = self.key.log2_n, self.key.r, self.key.p
        key = self.key.derive(salt, log2_n, r, p)
        nonce = secrets.token_bytes(12)
        header = _HEADER.pack(
            _MAGIC, _VERSION, self.key.kdf, log2_n, r, p, salt, nonce,
            self._key_check(key), self._binding_check(key, owner), counter,
        )  # fmt: skip
        return header + AESGCM(key).encrypt(nonce, plaintext, self._aad(owner, header))

    def _inspect(self, path: Path, owner: str) -> _Generation:
        """Classify one file (see :class:`_Generation`); never raises for its content."""
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return _Generation(path, "absent", f"{path}: missing")
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the store ({exc.strerror})") from exc
        if len(blob) < _HEADER.size + 16:
            return _Generation(
                path, "garbage", f"{path}: too short to be a store file (corrupted or truncated)"
            )
        header = blob[: _HEADER.size]
        magic, version, kdf, log2_n, r, p, salt, nonce, check, binding, counter = _HEADER.unpack(header)
        if magic != _MAGIC:
            return _Generation(path, "garbage", f"{path}: not a PFT store file (corrupted, or another file)")
        if version != _VERSION:
            return _Generation(path, "foreign", f"{path}: store format version {version} is not supported")
        if kdf != self.key.kdf:
            wanted = "a passphrase" if kdf == _KDF_SCRYPT else "a raw key"
            return _Generation(
                path, "foreign", f"{path}: this store is protected by {wanted}; the wrong kind was given"
            )
        if kdf == _KDF_SCRYPT and not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
            return _Generation(
                path, "garbage", f"{path}: implausible scrypt parameters in the header (corrupted)"
            )
        key = self.key.derive(salt, log2_n, r, p)
        if not hmac.compare_digest(check, self._key_check(key)):
            return _Generation(
                path,
                "foreign",
                f"{path}: wrong passphrase or key for this store (or its header is corrupted)",
            )
        if not hmac.compare_digest(binding, self._binding_check(key, owner)):
            return _Generation(
                path, "foreign",
                f"{path}: this store belongs to another owner or purpose than {owner!r}/{self.purpose!r}",
            )  # fmt: skip
        try:
            plaintext = AESGCM(key).decrypt(nonce, blob[_HEADER.size :], self._aad(owner, header))
        except InvalidTag:
            return _Generation(path, "garbage", f"{path}: authentication failed - the file is corrupted")
        self._salt = salt
        return _Generation(path, "ours", counter=counter, blob=blob, plaintext=plaintext)

    def _read_one(self, path: Path, owner: str) -> tuple[dict[str, Any], bytes]:
        """Decrypt one file; raises :class:`StoreAuthenticationError` (or FileNotFoundError)."""
        found = self._inspect(path, owner)
        if found.kind == "absent":
            raise FileNotFoundError(path)
        if found.kind != "ours":
            raise StoreAuthenticationError(found.reason)
        return unpack_payload(found.plaintext, str(path)), found.blob

    def _marks(self) -> tuple[int, int | None]:
        """``<name>.counter``: the newest generation written and the one kept as the backup
        (``(0, None)`` when unknown: then any backup this key opens may be used)."""
        try:
            fields = self.counter_path.read_text(encoding="ascii").split()
        except FileNotFoundError:
            return 0, None
        except (OSError, UnicodeDecodeError):
            fields = []
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            logger.warning("%s: unreadable generation counter; ignored", self.counter_path)
            return 0, None
        return int(fields[0]), int(fields[1])

    def _choose(self, owner: str) -> tuple[_Generation | None, str | None, list[_Generation]]:
        """The generation a reader may use, why the main file was not used, and both files.

        The newest generation written is the highest counter among this key's files and the
        ``.counter`` mark. The main file is used when it holds it; otherwise a mirror copy that
        holds it, or the previous-generation backup the mark says was kept (what a damaged
        current file costs, and no more). Returns ``(None, reason, files)`` when nothing may be used.
        """
        main, second = self._inspect(self.path, owner), self._inspect(self.backup_path, owner)
        files = [main, second]
        newest, kept = self._marks()
        high = max([newest, *(g.counter for g in files if g.kind == "ours")])
        if main.kind == "ours" and main.counter >= high:
            return main, None, files
        why = self._why_not(main, high)
        floor = high if self.backup == "mirror" else (kept or 0)
        if second.kind == "ours" and second.counter >= floor:
            return second, why, files
        return None, why, files

    def _why_not(self, found: _Generation, high: int) -> str:
        if found.kind == "ours":
            return (
                f"{found.path}: generation {found.counter} is older than the newest written ({high}): "
                "an older copy was put in place of the current one"
            )
        return found.reason

    def _refusal(self, why: str | None, files: list[_Generation]) -> StoreError:
        """The error for a store none of whose files may be used."""
        main, second = files
        if main.kind == "absent" and second.kind == "absent":
            return StoreError(f"{self.path}: no store here yet (nothing saved for this user)")
        high = max([self._marks()[0], *(g.counter for g in files if g.kind == "ours")])
        which = "previous" if self.backup == "previous" else "mirror"
        if second.kind == "absent":
            detail = f"{why}; no {which} copy to fall back to"
        else:
            detail = f"{why}; the {which} copy failed too: {self._why_not(second, high)}"
        if any(g.kind == "ours" for g in files):  # it opens, but it is older than what was written
            return StoreRollbackError(detail)
        return StoreAuthenticationError(detail)

    # public API ------------------------------------------------------------------------------
    def save(self, payload: dict[str, Any], *, owner: str) -> Path:
        """Encrypt and write ``payload`` atomically as the next generation.

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
        StoreAuthenticationError
            A generation on disk belongs to another key or owner (a mistyped passphrase or owner):
            nothing is overwritten.
        """
        _check_owner(owner)
        plaintext = pack_payload(payload)
        with self._lock():
            self._write(
                plaintext, owner, [self._inspect(self.path, owner), self._inspect(self.backup_path, owner)]
            )
        return self.path

    def update(
        self, change: Callable[[dict[str, Any] | None], dict[str, Any]], *, owner: str
    ) -> dict[str, Any]:
        """Read, change and write the store under one lock (no other writer in between).

        ``change`` gets the current payload (None when there is no readable generation) and
        returns the new one, which is written as the next generation and returned.

        Raises
        ------
        StoreRollbackError
            The newest readable generation is older than one already written.
        StoreAuthenticationError
            A generation belongs to another key or owner (nothing is written).
        """
        _check_owner(owner)
        with self._lock():
            chosen, why, files = self._choose(owner)
            if chosen is None and any(g.kind == "ours" for g in files):
                raise self._refusal(why, files)
            current = unpack_payload(chosen.plaintext, str(chosen.path)) if chosen is not None else None
            new = change(current)
            self._write(pack_payload(new), owner, files)
        return new

    def _write(self, plaintext: bytes, owner: str, files: list[_Generation]) -> None:
        """Write the next generation (the lock is held); never replaces a foreign generation."""
        self._remove_stale_temporaries()
        foreign = [g for g in files if g.kind == "foreign"]
        if foreign:
            raise StoreAuthenticationError(f"{foreign[0].reason}; refusing to overwrite it")
        main, second = files
        newest, kept = self._marks()
        high = max([newest, *(g.counter for g in files if g.kind == "ours")])
        blob = self._seal(plaintext, owner, high + 1)
        if self.backup == "mirror":
            atomic_write_bytes(self.backup_path, blob)  # the copy first: it is never behind
            kept = high + 1
        elif main.kind == "ours" and main.counter >= high:
            atomic_write_bytes(self.backup_path, main.blob)  # keep the newest good generation
            kept = main.counter
        elif kept is None:  # no mark: the backup stays, and stays usable
            kept = second.counter if second.kind == "ours" else 0
        atomic_write_bytes(self.path, blob)
        atomic_write_bytes(self.counter_path, f"{high + 1} {kept}\n".encode("ascii"))

    def read(self, *, owner: str) -> StoreRead:
        """Decrypt the store: the newest generation that authenticates and is not rolled back.

        With ``backup="previous"`` a damaged (or replaced) current file falls back to
        ``<name>.prev`` when that is at most one generation behind the newest written.

        Raises
        ------
        StoreRollbackError
            Only generations older than the newest written are left (old copies put in place).
        StoreAuthenticationError
            No generation authenticates (the message says why for each).
        StoreError
            If no generation exists.
        """
        _check_owner(owner)
        chosen, why, files = self._choose(owner)
        if chosen is None:
            raise self._refusal(why, files)
        payload = unpack_payload(chosen.plaintext, str(chosen.path))
        if chosen.path != self.path:
            logger.warning("%s; loaded the last good copy %s", why, chosen.path)
        return StoreRead(
            payload=payload,
            recovered_from_backup=chosen.path != self.path,
            source=chosen.path,
            failure=why,
            generation=chosen.counter,
        )

    def load(self, *, owner: str) -> dict[str, Any]:
        """The decrypted payload (see :meth:`read`, which also says whether the backup was used)."""
        return self.read(owner=owner).payload

    # housekeeping ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock:
            yield

    def _remove_stale_temporaries(self) -> None:
        """Delete temp files left by a writer killed mid-save (we hold the lock: none is live)."""
        for name in (self.path.name, self.backup_path.name, self.counter_path.name):
            for stale in self.path.parent.glob(f".{name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise StoreError("owner must be a non-empty user id")
