"""What may leave a device: named, finite, numeric metrics only (RELIABILITY row 14).

The Flower ClientApp builds every reply through :func:`metrics_reply`, and the ServerApp checks
every reply it receives with :func:`check_reply`, so one allow-list governs both ends. A reply
holds exactly one :class:`~flwr.app.MetricRecord` named ``"metrics"``; no ArrayRecord (frames,
features, translator weights) and no ConfigRecord (free text) is ever sent by a device.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from pft_core.errors import PFTError

RECORD_NAME = "metrics"

#: Allowed metric keys per message type (``category`` or ``category.action``).
ALLOWED_METRICS: dict[str, frozenset[str]] = {
    "query": frozenset({"bundle-current", "bundle-version", "subject-index"}),
    "train.install": frozenset({"bundle-version", "subject-index"}),
    "train": frozenset({"adapt-iterations", "adapt-seconds", "neutral-frames", "subject-index"}),
    "evaluate": frozenset(
        {"f1", "accuracy", "eval-frames", "adapt-iterations", "adapt-seconds", "subject-index"}
    ),
}

#: Keys whose value must lie in a closed interval (everything else must be finite and >= 0).
BOUNDS: dict[str, tuple[float, float]] = {
    "f1": (0.0, 100.0),
    "accuracy": (0.0, 100.0),
    "bundle-current": (0.0, 1.0),
}

#: Keys that count things: integers > 0 (a reply about zero frames is not a result).
POSITIVE_COUNTS = frozenset({"neutral-frames", "eval-frames"})


class EgressViolationError(PFTError):
    """A reply carries something other than allow-listed, finite, in-range numeric metrics."""


def check_metrics(message_type: str, metrics: Mapping[str, object]) -> dict[str, float]:
    """Validate metrics for a message type and return them as floats.

    Raises
    ------
    EgressViolationError
        An unknown message type or key, a non-numeric, NaN/Inf, negative or out-of-range value,
        or a non-positive count.
    """
    allowed = ALLOWED_METRICS.get(message_type)
    if allowed is None:
        raise EgressViolationError(f"no egress allow-list for message type {message_type!r}")
    unknown = sorted(set(metrics) - allowed)
    if unknown:
        raise EgressViolationError(f"{message_type}: metric key(s) {unknown} are not allow-listed")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressViolationError(f"{message_type}: {key} is {type(value).__name__}, not a number")
        number = float(value)
        if not math.isfinite(number):
            raise EgressViolationError(f"{message_type}: {key} = {number} is not finite")
        low, high = BOUNDS.get(key, (0.0, math.inf))
        if not low <= number <= high:
            raise EgressViolationError(f"{message_type}: {key} = {number} is outside [{low}, {high}]")
        if key in POSITIVE_COUNTS and (number <= 0 or number != int(number)):
            raise EgressViolationError(f"{message_type}: {key} = {number} must be a positive count")
        out[key] = number
    return out


def metrics_reply(message: Message, metrics: Mapping[str, int | float]) -> Message:
    """The reply to ``message`` carrying only ``metrics``, after the allow-list check.

    Raises
    ------
    EgressViolationError
        If the metrics break the allow-list (nothing is sent).
    """
    checked = check_metrics(message.metadata.message_type, metrics)
    return Message(RecordDict({RECORD_NAME: MetricRecord(dict(checked))}), reply_to=message)


def check_reply(message_type: str, content: RecordDict) -> dict[str, float]:
    """Check a received reply's content against the allow-list and return its metrics.

    Raises
    ------
    EgressViolationError
        If the content holds any record but the one MetricRecord, or its metrics are not allowed.
    """
    names = list(content.keys())
    if names != [RECORD_NAME]:
        raise EgressViolationError(
            f"{message_type}: reply holds records {names}, expected only [{RECORD_NAME!r}]"
        )
    record = content[RECORD_NAME]
    if not isinstance(record, MetricRecord):
        raise EgressViolationError(
            f"{message_type}: {RECORD_NAME!r} is a {type(record).__name__}, not a MetricRecord"
        )
    return check_metrics(message_type, dict(record))


def describe_outgoing(message: Message) -> dict[str, Any]:
    """A JSON-able account of one outgoing message: type, error, every record's kind and keys."""
    entry: dict[str, Any] = {"type": message.metadata.message_type, "error": None, "records": {}}
    if message.has_error():
        entry["error"] = message.error.reason
        return entry
    for name, record in message.content.items():
        keys = sorted(record.keys()) if hasattr(record, "keys") else []
        item: dict[str, Any] = {"kind": type(record).__name__, "keys": keys}
        if isinstance(record, MetricRecord):
            item["values"] = {k: record[k] for k in keys}
        entry["records"][name] = item
    return entry


def make_egress_audit_mod(log_path: str | Path) -> Mod:
    """A ClientApp mod appending every reply that leaves the node to a JSON-lines audit log.

    It records what was sent (see :func:`describe_outgoing`), never alters it; one line per reply,
    written with ``O_APPEND`` so concurrent ClientApp processes of one node do not interleave.
    """
    path = Path(log_path)

    def audit(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        line = json.dumps(describe_outgoing(reply), sort_keys=True) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return reply

    return audit
