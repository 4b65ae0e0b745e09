"""Content-addressed feature cache: F(x) is computed once per (video content, extractor weights).

Keys come from SHA-256 digests (:func:`file_sha256` of the video, :func:`state_dict_sha256` of the
feature extractor); values are safetensors files written atomically, so a killed process never
leaves a torn entry and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from pft.core.atomic import atomic_write_bytes

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over a state dict's names, dtypes, shapes and raw bytes.

    Independent of the dict's order (names are sorted); any change to a value, a dtype, a shape or
    a name changes the digest.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        data = _tensor_bytes(tensor)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class FeatureCache:
    """Tensors keyed by content hashes, stored as ``root/<key[:2]>/<key>.safetensors``.

    Parameters
    ----------
    root:
        The cache folder (created when first written).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    @staticmethod
    def key(*parts: str) -> str:
        """A cache key (hex SHA-256) from string parts, e.g. video and weights digests."""
        if not parts:
            raise ValueError("a cache key needs at least one part")
        return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The stored tensors, or ``None`` when absent or unreadable (treated as a miss)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Store tensors (written to a temp file, fsynced, renamed) and return the file."""
        blob = save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})
        return atomic_write_bytes(self.path(key), blob)
