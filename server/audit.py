"""The server's audit log: append-only JSON lines, one fsync'd line per event, hash-chained.

Each line is one JSON object ``{"ts": "<UTC ISO-8601>", "event": "<name>", ...fields, "seq": n,
"prev": "<sha256 hex of the previous record's line>"}``. Lines are appended with ``O_APPEND``
under an advisory lock and ``fsync``'d before the call returns, so a line that was reported
written survives a crash; a process killed while writing can leave at most one torn LAST line,
which :func:`read_audit_log` reports and skips (every earlier line must parse, else
:class:`AuditLogError`), and the next append chains from the last whole record.

Tamper evidence (:func:`verify_audit_log`, ``pft server audit --verify``): ``seq`` counts the
records and ``prev`` chains each to the one before, so an edited or deleted line breaks the chain
at the next record. The head (last ``seq`` and the hash of the last line) is written after each
append to an ANCHOR file (default ``<log>.head``), which the log alone cannot rewrite: deleting or
editing the last line no longer matches it. Limit: whoever can rewrite both the log and its
anchor (and recompute every hash) can rewrite history; keep the anchor on other storage (another
disk, host or an append-only service) or record the head ``--verify`` prints somewhere else.

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
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pft.core.atomic import atomic_write_text
from pft.core.errors import PFTError

if TYPE_CHECKING:
    from pft.server.rounds import Exchange

__all__ = [
    "GENESIS",
    "AuditLog",
    "AuditLogError",
    "AuditRead",
    "AuditVerification",
    "RunAudit",
    "anchor_path",
    "read_audit_log",
    "utc_now",
    "verify_audit_log",
]

#: The ``prev`` of the first record.
GENESIS = "0" * 64
#: How much of the log's end an append reads to find the last record it chains from.
_TAIL_BYTES = 1 << 20


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


def anchor_path(log_path: str | Path) -> Path:
    """The default anchor of a log: ``<log>.head`` beside it."""
    path = Path(log_path)
    return path.with_name(path.name + ".head")


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _record(raw: bytes) -> dict[str, Any] | None:
    """The record a line holds, or None (torn, or not a record)."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("event"), str) else None


def _last_record(fd: int) -> tuple[int, str]:
    """``(seq, hash)`` of the last whole record in the file (``(-1, GENESIS)`` when none)."""
    size = os.fstat(fd).st_size
    start = max(0, size - _TAIL_BYTES)
    tail = os.pread(fd, size - start, start)
    lines = tail.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first piece may be the end of a longer line
    for raw in reversed(lines):
        record = _record(raw)
        if record is not None and isinstance(record.get("seq"), int):
            return int(record["seq"]), _line_hash(raw)
    if start > 0:
        raise AuditLogError("no whole record in the last MB of the audit log; it cannot be chained")
    return -1, GENESIS


@dataclass(frozen=True)
class AuditLog:
    """An append-only, hash-chained audit log file and its anchor (created on the first event).

    ``anchor``: where the head is written after each append (default :func:`anchor_path`).
    """

    path: Path
    anchor: Path | None = None

    @property
    def anchor_file(self) -> Path:
        """The anchor actually used."""
        return self.anchor if self.anchor is not None else anchor_path(self.path)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event as one JSON line, chained to the last record, fsync it, move the anchor.

        Parameters
        ----------
        event:
            The event name, e.g. ``"bundle.published"``.
        **fields:
            JSON-serialisable details (paths become strings, sets sorted lists).

        Returns
        -------
        dict
            The record written (with its ``seq`` and ``prev``).

        Raises
        ------
        AuditLogError
            If the line cannot be written (the caller decides whether that stops the work).
        """
        if not event or "\n" in event:
            raise AuditLogError(f"invalid audit event name {event!r}")
        record: dict[str, Any] = {"ts": utc_now(), "event": event}
        record.update(_plain({k: v for k, v in fields.items() if k not in ("seq", "prev")}))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                _terminate_torn_line(fd)
                seq, prev = _last_record(fd)
                record["seq"], record["prev"] = seq + 1, prev
                line = json.dumps(record, sort_keys=False, allow_nan=False, separators=(",", ":")).encode()
                data = line + b"\n"
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
                head = {"log": self.path.name, "seq": seq + 1, "head": _line_hash(line), "ts": record["ts"]}
                atomic_write_text(self.anchor_file, json.dumps(head, sort_keys=True) + "\n")
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


@dataclass(frozen=True)
class AuditVerification:
    """What :func:`verify_audit_log` found: ``ok``, the records checked, the head, and problems."""

    ok: bool
    records: int
    head: str
    problems: list[str] = field(default_factory=list)


def verify_audit_log(path: str | Path, anchor: str | Path | None = None) -> AuditVerification:
    """Check the hash chain of an audit log and its head against the anchor.

    Every record must carry ``seq`` 0, 1, 2... and ``prev`` = the SHA-256 of the previous record's
    line (torn lines left by a crash are skipped, as by :func:`read_audit_log`); the anchor must
    name the last record's ``seq`` and hash. An edited line breaks the chain at the next record
    (or the anchor, for the last one); a deleted line breaks ``seq``; a deleted last line leaves
    the anchor pointing past the end.

    Parameters
    ----------
    path:
        The audit log.
    anchor:
        Its anchor (default :func:`anchor_path`).
    """
    path = Path(path)
    anchor = Path(anchor) if anchor is not None else anchor_path(path)
    problems: list[str] = []
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        lines = []
    if lines and lines[-1] == b"":
        lines.pop()
    expected_seq, prev, count = 0, GENESIS, 0
    for number, raw in enumerate(lines, start=1):
        record = _record(raw)
        if record is None:
            if number == len(lines) or not raw.rstrip().endswith(b"}"):
                continue  # a torn line (a writer killed mid-line); the chain skips it
            problems.append(f"line {number}: not an audit record (the log was altered)")
            break
        if record.get("seq") != expected_seq:
            problems.append(
                f"line {number}: seq {record.get('seq')!r}, expected {expected_seq} "
                "(a record was removed or inserted, or the log predates hash chaining)"
            )
            break
        if record.get("prev") != prev:
            problems.append(f"line {number}: does not chain to the record before it (a record was edited)")
            break
        expected_seq, prev, count = expected_seq + 1, _line_hash(raw), count + 1
    if not problems:
        try:
            head = json.loads(anchor.read_text())
            anchored_seq, anchored_head = head["seq"], head["head"]
        except FileNotFoundError:
            if count:
                problems.append(f"{anchor}: no anchor; cannot tell whether records were removed from the end")
            anchored_seq, anchored_head = -1, GENESIS
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"{anchor}: unreadable anchor")
            anchored_seq, anchored_head = None, None
        if anchored_seq is not None and not problems:
            if anchored_seq > count - 1:
                problems.append(
                    f"the anchor names record {anchored_seq} but the log ends at record {count - 1}: "
                    "records were removed from the end"
                )
            elif anchored_seq < count - 1:
                problems.append(
                    f"records after {anchored_seq} are not anchored (appended without the anchor, or a "
                    "crash between the append and the anchor: the next append anchors them)"
                )
            elif anchored_head != prev:
                problems.append("the last record does not match the anchor's hash (it was edited)")
    return AuditVerification(ok=not problems, records=count, head=prev, problems=problems)
