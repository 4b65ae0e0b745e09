"""JSON from untrusted bytes: size and nesting limits BEFORE anything is built, strict parsing.

Manifests, signature records, safetensors headers, store containers and bundle configs come from
files a hostile party may have written. :func:`read_bounded` never reads more than the limit
(a 400 MB "manifest" costs at most the limit in memory), and :func:`parse_untrusted_json` refuses
duplicate keys and NaN/Infinity, turns the parser's ``RecursionError`` on deeply nested input into
the caller's typed error, and then checks the nesting depth of what was parsed.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from pft.core.errors import PFTError

__all__ = ["MAX_JSON_DEPTH", "json_depth", "parse_untrusted_json", "read_bounded"]

#: Deepest nesting accepted in any document this project reads (its own files need at most 6).
MAX_JSON_DEPTH = 32


def read_bounded(path: str | Path, limit: int, error: type[PFTError], what: str) -> bytes:
    """Read a regular file of at most ``limit`` bytes (links are not followed).

    Parameters
    ----------
    path:
        The file.
    limit:
        Largest accepted size in bytes; a larger file is refused after reading ``limit + 1`` bytes
        at most.
    error:
        The typed error to raise (e.g. :class:`~pft.core.errors.BundleSignatureError`).
    what:
        What the file is, for the message (e.g. ``"manifest"``).

    Raises
    ------
    FileNotFoundError
        The file does not exist (callers decide what a missing file means).
    error
        Not a regular file, unreadable, or larger than ``limit``.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise error(f"{path}: the {what} is not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path}: the {what} is larger than {limit} bytes; refused before parsing")
    return data


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` and ``{}`` are 1)."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        if isinstance(item, dict):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in item)
    return depth


def parse_untrusted_json(
    data: bytes,
    *,
    where: str,
    error: type[PFTError],
    max_bytes: int,
    max_depth: int = MAX_JSON_DEPTH,
    what: str = "document",
) -> Any:
    """Parse UTF-8 JSON strictly, within a size and a nesting limit.

    Parameters
    ----------
    data:
        The bytes (already bounded by the caller's read, checked again here).
    where:
        A name for messages (usually the path).
    error:
        The typed error raised for every refusal.
    max_bytes, max_depth:
        Largest accepted size and nesting depth.
    what:
        What the document is, for the message.

    Returns
    -------
    Any
        The parsed value.

    Raises
    ------
    error
        Too large, too deeply nested, not UTF-8, not JSON, duplicate keys, or NaN/Infinity.
    """
    if len(data) > max_bytes:
        raise error(f"{where}: the {what} is larger than {max_bytes} bytes; refused before parsing")
    try:
        value = json.loads(
            data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except RecursionError as exc:
        raise error(f"{where}: the {what} is nested deeper than {max_depth} levels") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{where}: the {what} is not valid JSON ({exc})") from exc
    if json_depth(value) > max_depth:
        raise error(f"{where}: the {what} is nested deeper than {max_depth} levels")
    return value
