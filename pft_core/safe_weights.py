"""Weights that load without running code: safetensors and pickle-free numpy only.

A weights file is checked byte by byte before anything reads it: a safetensors file starts with an
8-byte little-endian header length, then a JSON header whose tensor entries must fit exactly in
the rest of the file. Anything else - a ``torch.save`` zip archive, a raw pickle, a truncated or
inflated file - is refused with :class:`~pft.core.errors.UnsafeWeightsError`, and no unpickler is
ever invoked (docs/reliability.md case 3).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from pft.core.atomic import atomic_write_bytes
from pft.core.errors import UnsafeWeightsError
from pft.core.untrusted_json import parse_untrusted_json

__all__ = [
    "MAX_HEADER_BYTES",
    "check_safetensors_bytes",
    "load_numpy_array",
    "load_safetensors",
    "load_safetensors_bytes",
    "safetensors_bytes",
    "save_safetensors",
]

#: Largest JSON header accepted (safetensors itself allows 100 MB; this project's headers are a few
#: KB): refused from the declared length, before the header is read or parsed.
MAX_HEADER_BYTES = 16 << 20
#: Deepest nesting a header may have (tensor name -> entry -> list: 3).
MAX_HEADER_DEPTH = 4

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ZIP_MAGIC = b"PK\x03\x04"
_NUMPY_MAGIC = b"\x93NUMPY"


def _describe_foreign(prefix: bytes) -> str:
    """A human hint for what a non-safetensors file probably is."""
    if prefix.startswith(_ZIP_MAGIC):
        return "it is a zip archive, as written by torch.save (a pickle inside); re-export with safetensors"
    if prefix[:1] == b"\x80" and len(prefix) > 1 and prefix[1] <= 5:
        return "it is a raw pickle; pickles can run code and are never loaded"
    if prefix.startswith(_NUMPY_MAGIC):
        return "it is a numpy .npy file; load it with load_numpy_array"
    return "it is not a safetensors file"


def check_safetensors_bytes(prefix: bytes, total_size: int, where: str) -> dict[str, Any]:
    """Validate a safetensors header without trusting anything in it.

    Parameters
    ----------
    prefix:
        The first bytes of the file: at least 8 + the header length it declares.
    total_size:
        The full size of the file in bytes.
    where:
        A name for error messages (the path).

    Returns
    -------
    dict
        The parsed header (tensor entries and the optional ``__metadata__``).

    Raises
    ------
    UnsafeWeightsError
        If the bytes are not a well-formed safetensors file.
    """
    if total_size < 8 or len(prefix) < 8:
        raise UnsafeWeightsError(f"{where}: too short to be a safetensors file ({total_size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > total_size:
        raise UnsafeWeightsError(
            f"{where}: {_describe_foreign(prefix)} (declared header of {header_len} bytes)"
        )
    if len(prefix) < 8 + header_len:
        raise UnsafeWeightsError(f"{where}: header shorter than declared")
    raw = prefix[8 : 8 + header_len]
    if raw[:1] != b"{":
        raise UnsafeWeightsError(f"{where}: {_describe_foreign(prefix)}")
    header = parse_untrusted_json(
        bytes(raw).rstrip(b" "),
        where=where,
        error=UnsafeWeightsError,
        max_bytes=MAX_HEADER_BYTES,
        max_depth=MAX_HEADER_DEPTH,
        what="safetensors header",
    )
    if not isinstance(header, dict):
        raise UnsafeWeightsError(f"{where}: the safetensors header is not a JSON object")
    data_size = total_size - 8 - header_len
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise UnsafeWeightsError(f"{where}: __metadata__ must map strings to strings")
            continue
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            width = _DTYPE_BYTES[dtype]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ValueError("bad shape")
            begin, end = offsets
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
                raise ValueError("offsets outside the file")
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsafeWeightsError(f"{where}: malformed entry for tensor {name!r} ({exc})") from exc
        if end - begin != math.prod(shape) * width:
            raise UnsafeWeightsError(f"{where}: tensor {name!r} size does not match its shape and dtype")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise UnsafeWeightsError(f"{where}: tensor data overlaps or leaves gaps")
        position = end
    if position != data_size:
        raise UnsafeWeightsError(f"{where}: {data_size - position} trailing bytes after the tensor data")
    return header


def load_safetensors_bytes(data: bytes, where: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Validate and load safetensors bytes into CPU tensors (never unpickles).

    Raises
    ------
    UnsafeWeightsError
        If the bytes are not a well-formed safetensors file.
    """
    check_safetensors_bytes(data, len(data), where)
    try:
        return dict(_st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UnsafeWeightsError(f"{where}: safetensors refused the file ({exc})") from exc


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors weights file after checking it is one; never runs code from the file.

    Parameters
    ----------
    path:
        The ``.safetensors`` file.

    Returns
    -------
    dict[str, torch.Tensor]
        The tensors (CPU).

    Raises
    ------
    UnsafeWeightsError
        If the file is a pickle, a ``torch.save`` archive, truncated, or otherwise malformed.
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    data = path.read_bytes()
    return load_safetensors_bytes(data, str(path))


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise tensors to safetensors bytes (copies to contiguous CPU memory; shared storage is fine)."""
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return bytes(_st_save(plain, metadata=dict(metadata) if metadata else None))


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors to a safetensors file atomically (temp file, fsync, rename).

    Parameters
    ----------
    tensors:
        Name -> tensor.
    path:
        Destination.
    metadata:
        Optional string -> string metadata stored in the header.

    Returns
    -------
    Path
        The written path.
    """
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_numpy_array(path: str | Path) -> np.ndarray:
    """Load a single ``.npy`` array with ``allow_pickle=False``.

    Raises
    ------
    UnsafeWeightsError
        If the file is not a ``.npy`` file or holds objects (which would need a pickle).
    """
    path = Path(path)
    with path.open("rb") as handle:
        magic = handle.read(len(_NUMPY_MAGIC))
    if magic != _NUMPY_MAGIC:
        raise UnsafeWeightsError(f"{path}: not a .npy file; {_describe_foreign(magic + b'  ')}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise UnsafeWeightsError(f"{path}: refused, the array needs a pickle to load ({exc})") from exc
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load on .npy always gives an array
        raise UnsafeWeightsError(f"{path}: not a single array")
    return array
