"""What may leave a device: named, finite, numeric metrics only (docs/reliability.md case 14).

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

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

from pft.core.errors import PFTError

RECORD_NAME = "metrics"

#: Allowed metric keys per message type (``category`` or ``category.action``).
ALLOWED_METRICS: dict[str, frozenset[str]] = {
    "query": frozenset({"bundle-current", "bundle-version", "subject-index"}),
    "train.install": frozenset({"bundle-version", "subject-index"}),
    "train": frozenset(
        {
            "adapt-iterations",
            "adapt-seconds",
            "neutral-frames",
            "subject-index",
            "pairing-fallback",
            # with DP on: the release's accounting (public by design) and the ledger's total
            "dp-epsilon",
            "dp-noise-multiplier",
            "dp-sample-rate",
            "dp-steps",
            "dp-group-epsilon",
            "dp-group-size",
            "dp-cumulative-epsilon",
        }
    ),
    "evaluate": frozenset(
        {"f1", "accuracy", "eval-frames", "adapt-iterations", "adapt-seconds", "subject-index"}
    ),
}

#: Keys whose value must lie in a closed interval (everything else must be finite and >= 0).
BOUNDS: dict[str, tuple[float, float]] = {
    "f1": (0.0, 100.0),
    "accuracy": (0.0, 100.0),
    "bundle-current": (0.0, 1.0),
    "pairing-fallback": (0.0, 1.0),
    "dp-sample-rate": (0.0, 1.0),
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


# --- the opt-in federated translator prior (client/prior_app.py) -------------------------------
#: Properties a node answers the prior's consent question with (legacy ``get_properties``).
PRIOR_PROPERTIES = frozenset({"prior-opt-in", "bundle-version"})

#: SecAgg+ reply keys (flwr's ``secaggplus_constants.Key`` values): public keys, encrypted key
#: shares, the MASKED quantised update, secret-key shares of neighbours. Nothing else.
SECAGG_REPLY_KEYS = frozenset(
    {
        SecAggKey.PUBLIC_KEY_1,
        SecAggKey.PUBLIC_KEY_2,
        SecAggKey.DESTINATION_LIST,
        SecAggKey.CIPHERTEXT_LIST,
        SecAggKey.MASKED_PARAMETERS,
        SecAggKey.NODE_ID_LIST,
        SecAggKey.SHARE_LIST,
    }
)
SECAGG_RECORD = RECORD_KEY_CONFIGS
_STATUS_KEYS = frozenset({"code", "message"})


def _only_records(message_type: str, content: RecordDict, allowed: frozenset[str]) -> None:
    extra = sorted(set(content.keys()) - allowed)
    if extra:
        raise EgressViolationError(f"{message_type}: reply holds record(s) {extra} outside the allow-list")


def check_prior_reply(message_type: str, content: RecordDict, opted_in: bool) -> None:
    """Check a reply of the federated-prior ClientApp before it leaves the node.

    Without opt-in, only the consent answer (``get_properties``: ``prior-opt-in``,
    ``bundle-version``) may leave. With opt-in, a ``train`` reply may also carry the SecAgg+
    protocol's own records: keys, encrypted shares and the MASKED update (the SecAgg+ configs record), an
    EMPTY parameters record, no fit metrics, a weight of exactly 1 (the person) and a status.

    Raises
    ------
    EgressViolationError
        Anything else: a plaintext array, a metric, a free-text record, a train reply without opt-in.
    """
    if message_type == "get_properties":
        _only_records(
            message_type, content, frozenset({"getpropertiesres.properties", "getpropertiesres.status"})
        )
        props = content.get("getpropertiesres.properties")
        if not isinstance(props, ConfigRecord):
            raise EgressViolationError("get_properties: no properties record")
        unknown = sorted(set(props.keys()) - PRIOR_PROPERTIES)
        if unknown:
            raise EgressViolationError(f"get_properties: propertie(s) {unknown} are not allow-listed")
        for key, value in props.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise EgressViolationError(f"get_properties: {key} = {value!r} is not a finite number")
        _check_status(message_type, content.get("getpropertiesres.status"))
        return
    if message_type != "train":
        raise EgressViolationError(f"the prior app sends no {message_type!r} replies")
    if not opted_in:
        raise EgressViolationError("train: this node did not opt in to the federated prior; nothing is sent")
    allowed = frozenset(
        {SECAGG_RECORD, "fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}
    )
    _only_records(message_type, content, allowed)
    secagg = content.get(SECAGG_RECORD)
    if not isinstance(secagg, ConfigRecord):
        raise EgressViolationError("train: a prior reply must be a SecAgg+ message")
    unknown = sorted(set(secagg.keys()) - SECAGG_REPLY_KEYS)
    if unknown:
        raise EgressViolationError(f"train: SecAgg+ record holds key(s) {unknown}")
    arrays = content.get("fitres.parameters")
    if arrays is not None and (not isinstance(arrays, ArrayRecord) or len(arrays) > 0):
        raise EgressViolationError("train: plaintext parameters must never leave (only the masked vector)")
    metrics = content.get("fitres.metrics")
    if metrics is not None and (not isinstance(metrics, ConfigRecord) or len(metrics) > 0):
        raise EgressViolationError("train: a prior reply carries no fit metrics")
    weight = content.get("fitres.num_examples")
    if weight is not None and (not isinstance(weight, MetricRecord) or dict(weight) != {"num_examples": 1}):
        raise EgressViolationError("train: a prior update has weight 1 (one person), nothing else")
    if "fitres.status" in content:
        _check_status(message_type, content.get("fitres.status"))


def _check_status(message_type: str, record: object) -> None:
    if not isinstance(record, ConfigRecord) or set(record.keys()) != _STATUS_KEYS:
        raise EgressViolationError(f"{message_type}: malformed status record")
