"""The server's audit log: append-only JSON lines, one fsync'd line per event, never rewritten.

Each line is one JSON object ``{"ts": "<UTC ISO-8601>", "event": "<name>", ...fields}``. Lines
are appended with ``O_APPEND`` under an advisory lock and ``fsync``'d before the call returns,
so a line that was reported written survives a crash; a process killed while writing can leave
at most one torn LAST line, which :func:`read_audit_log` reports and skips (every earlier line
must parse, else :class:`AuditLogError`).

Events written by this project (fields beyond ``ts``/``event``):

- ``node.registered``: ``name``, ``public_key_sha256`` (``pft server register-node``)
- ``bundle.published``: ``version``, ``digest``, ``key_id``, ``dir``, ``files`` (``pft server publish``)
- ``run.started``: ``run_id``, ``bundle_version``, ``bundle_digest``, ``min_nodes``, ``rounds``
- ``run.nodes``: ``run_id``, ``nodes`` (the node ids that connected in time)
- ``exchange``: ``run_id``, ``round`` (0 before the first round), ``type``, ``asked``,
  ``replied``, ``failures`` (node id -> reason), ``seconds``
- ``run.finished``: ``run_id``, ``status`` (``completed`` / ``failed``), ``reason``, ``completed``
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pft.core.errors import PFTError

if TYPE_CHECKING:
    from pft.server.rounds import Exchange

__all__ = ["AuditLog", "AuditLogError", "AuditRead", "RunAudit", "read_audit_log", "utc_now"]


class AuditLogError(PFTError):
    """The audit log cannot be written, or a line other than the last one is not valid JSON."""


def utc_now() -> str:
    """The current time in UTC, ISO-8601 with microseconds and a ``Z`` suffix."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _plain(value: Any) -> Any:
    """Values as plain JSON (mappings with string keys, lists, finite numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [_plain(v) for v in items]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass(frozen=True)
class AuditLog:
    """An append-only audit log file (created with its folder on the first event)."""

    path: Path

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event as one JSON line and fsync it; returns the record written.

        Parameters
        ----------
        event:
            The event name, e.g. ``"bundle.published"``.
        **fields:
            JSON-serialisable details (paths become strings, sets sorted lists).

        Raises
        ------
        AuditLogError
            If the line cannot be written (the caller decides whether that stops the work).
        """
        if not event or "\n" in event:
            raise AuditLogError(f"invalid audit event name {event!r}")
        record: dict[str, Any] = {"ts": utc_now(), "event": event}
        record.update(_plain(fields))
        line = (json.dumps(record, sort_keys=False, allow_nan=False, separators=(",", ":")) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                _terminate_torn_line(fd)
                written = 0
                while written < len(line):
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the lock
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot append to the audit log ({exc.strerror})") from exc
        return record


def _terminate_torn_line(fd: int) -> None:
    """If a killed writer left the file without a final newline, end that torn line first."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


@dataclass(frozen=True)
class AuditRead:
    """What :func:`read_audit_log` found: the events, and the torn lines it skipped."""

    events: list[dict[str, Any]]
    torn_lines: list[int]

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The events named ``event`` whose fields equal ``match``."""
        return [
            e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]


def read_audit_log(path: str | Path) -> AuditRead:
    """Read an audit log, tolerating a torn last line (and torn lines a later append closed).

    A line that does not parse is accepted as torn only if it is the last line, or if it does not
    end with ``}`` (a write cut short, closed by the next append). Any other bad line raises.

    Raises
    ------
    AuditLogError
        A complete line in the middle of the log is not a JSON object (the log was altered).
    """
    path = Path(path)
    if not path.exists():
        return AuditRead([], [])
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    events: list[dict[str, Any]] = []
    torn: list[int] = []
    for number, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            events.append(record)
        elif number == len(lines) or not raw.rstrip().endswith(b"}"):
            torn.append(number)
        else:
            raise AuditLogError(f"{path}: line {number} is not an audit record")
    return AuditRead(events, torn)


@dataclass(frozen=True)
class RunAudit:
    """The audit events of one Flower run (no-op where the server spec names no audit log)."""

    log: AuditLog | None
    run_id: int

    def event(self, event: str, **fields: Any) -> None:
        """Append ``event`` with this run's id (nothing if there is no log)."""
        if self.log is not None:
            self.log.append(event, run_id=self.run_id, **fields)

    def exchange(self, round_no: int, outcome: Exchange) -> None:
        """One exchange: its round, message type, the nodes asked, replies and failures."""
        asked = sorted({*outcome.replies, *outcome.failures})
        self.event(
            "exchange",
            round=round_no,
            type=outcome.message_type,
            asked=asked,
            replied=sorted(outcome.replies),
            failures={str(k): v for k, v in sorted(outcome.failures.items())},
            seconds=round(outcome.seconds, 3),
        )
