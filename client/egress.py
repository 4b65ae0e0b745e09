"""What may leave a device: named, finite, numeric metrics only (docs/reliability.md case 14).

The Flower ClientApp builds every reply through :func:`metrics_reply`, and the ServerApp checks
every reply it receives with :func:`check_reply`, so one allow-list governs both ends. A reply
holds exactly one :class:`~flwr.app.MetricRecord` named ``"metrics"`` with exactly the keys of its
message type, each finite and within its bounds; no ArrayRecord (frames, features, translator
weights) and no ConfigRecord (free text) is ever sent by a device.

Error replies leave too: :func:`make_egress_guard_mod` (the ClientApp's outermost mod) turns an
exception raised by a handler into an error reply carrying a code and a FIXED message
(:data:`ERROR_REPLIES`) - never the exception's text, which may name local paths or the person -
checks every outgoing reply once more, and appends it to the node's egress audit log.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

from pft.core.errors import (
    BundleError,
    BundleRollbackError,
    BundleSignatureError,
    BundleTamperedError,
    BundleUnsignedFileError,
    LedgerIntegrityError,
    PFTError,
    PrivacyBudgetExceededError,
    StoreAuthenticationError,
    StoreError,
    TooFewFacesError,
    UnsafeWeightsError,
    VideoError,
)

logger = logging.getLogger(__name__)

RECORD_NAME = "metrics"

#: Keys a reply carries only in some runs: the DP release's accounting (public by design) and the
#: ledger's total, present only with DP on.
OPTIONAL_METRICS = frozenset(
    {
        "dp-epsilon",
        "dp-noise-multiplier",
        "dp-sample-rate",
        "dp-steps",
        "dp-group-epsilon",
        "dp-group-size",
        "dp-cumulative-epsilon",
    }
)

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
        }
        | OPTIONAL_METRICS
    ),
    "evaluate": frozenset(
        {"f1", "accuracy", "eval-frames", "adapt-iterations", "adapt-seconds", "subject-index"}
    ),
}

#: The closed interval every value must lie in: a reply is a schema, not just "finite numbers"
#: (1e300 iterations or a subject index of a billion is refused at both ends).
BOUNDS: dict[str, tuple[float, float]] = {
    "f1": (0.0, 100.0),
    "accuracy": (0.0, 100.0),
    "bundle-current": (0.0, 1.0),
    "pairing-fallback": (0.0, 1.0),
    "bundle-version": (0.0, 2.0**31 - 1),
    "subject-index": (0.0, 1e6),
    "adapt-iterations": (0.0, 1e6),
    "adapt-seconds": (0.0, 7 * 86400.0),
    "neutral-frames": (1.0, 1e8),
    "eval-frames": (1.0, 1e8),
    "dp-epsilon": (0.0, 1e6),
    "dp-noise-multiplier": (0.0, 1e6),
    "dp-sample-rate": (0.0, 1.0),
    "dp-steps": (0.0, 1e9),
    "dp-group-epsilon": (0.0, 1e6),
    "dp-group-size": (1.0, 1e8),
    "dp-cumulative-epsilon": (0.0, 1e6),
}

#: Keys that count things: integers (frames: > 0, a reply about zero frames is not a result).
INTEGER_KEYS = frozenset(
    {
        "bundle-current",
        "bundle-version",
        "subject-index",
        "adapt-iterations",
        "neutral-frames",
        "eval-frames",
        "pairing-fallback",
        "dp-steps",
        "dp-group-size",
    }
)
POSITIVE_COUNTS = frozenset({"neutral-frames", "eval-frames"})


class EgressViolationError(PFTError):
    """A reply carries something other than allow-listed, finite, in-range numeric metrics."""


def check_metrics(message_type: str, metrics: Mapping[str, object]) -> dict[str, float]:
    """Validate metrics for a message type and return them as floats.

    The metrics must be exactly the message type's keys (a reply missing one is as wrong as one
    with an extra key; only :data:`OPTIONAL_METRICS`, the DP accounting, may be absent), each a
    finite number within :data:`BOUNDS`, counts integral.

    Raises
    ------
    EgressViolationError
        An unknown message type or key, a missing key, a non-numeric, NaN/Inf, out-of-range or
        non-integral value, or a non-positive count.
    """
    allowed = ALLOWED_METRICS.get(message_type)
    if allowed is None:
        raise EgressViolationError(f"no egress allow-list for message type {message_type!r}")
    unknown = sorted(set(metrics) - allowed)
    if unknown:
        raise EgressViolationError(f"{message_type}: metric key(s) {unknown} are not allow-listed")
    missing = sorted(allowed - OPTIONAL_METRICS - set(metrics))
    if missing:
        raise EgressViolationError(f"{message_type}: metric key(s) {missing} are missing")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressViolationError(f"{message_type}: {key} is {type(value).__name__}, not a number")
        number = float(value)
        if not math.isfinite(number):
            raise EgressViolationError(f"{message_type}: {key} = {number} is not finite")
        if key in POSITIVE_COUNTS and (number <= 0 or number != int(number)):
            raise EgressViolationError(f"{message_type}: {key} = {number} must be a positive count")
        low, high = BOUNDS.get(key, (0.0, 0.0))
        if not low <= number <= high:
            raise EgressViolationError(f"{message_type}: {key} = {number:g} is outside [{low:g}, {high:g}]")
        if key in INTEGER_KEYS and number != int(number):
            raise EgressViolationError(f"{message_type}: {key} = {number} must be an integer")
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


#: Error replies a node may send: the exception type (most specific first), a code, and the FIXED
#: message that leaves instead of the exception's text (which may hold local paths or the
#: person's id; the full text stays in the node's log).
ERROR_REPLIES: tuple[tuple[type[BaseException], int, str], ...] = (
    (EgressViolationError, 1101, "the reply was refused by the node's egress allow-list"),
    (BundleSignatureError, 1201, "bundle refused: its signature does not verify with the trusted key"),
    (BundleRollbackError, 1202, "bundle refused: it is older than the installed version"),
    (BundleUnsignedFileError, 1203, "bundle refused: it holds a file its signed manifest does not list"),
    (BundleTamperedError, 1204, "bundle refused: a file does not match its signed manifest"),
    (UnsafeWeightsError, 1205, "bundle refused: its weights are not plain safetensors"),
    (BundleError, 1200, "no usable bundle on the node (refused, missing or not loadable)"),
    (TooFewFacesError, 1301, "too few usable face frames to adapt on"),
    (VideoError, 1300, "the node's videos could not be used"),
    (LedgerIntegrityError, 1402, "the node's privacy ledger cannot be trusted: no DP release was run"),
    (PrivacyBudgetExceededError, 1401, "the node's privacy budget is spent: nothing was run"),
    (StoreAuthenticationError, 1501, "the node's personal state does not open (damaged, or another key)"),
    (StoreError, 1500, "the node's personal state could not be read or written"),
    (PFTError, 1000, "the node could not do this task (details in the node's log)"),
    (Exception, 1999, "internal error on the node (details in the node's log)"),
)
#: Sent when a reply cannot be written to the node's audit log (nothing else leaves).
AUDIT_FAILED = (1102, "the node could not audit its reply; nothing else was sent")
_FIXED_ERRORS = frozenset((code, text) for _, code, text in ERROR_REPLIES) | {AUDIT_FAILED}


def error_reply(message: Message, exc: BaseException) -> Message:
    """The error reply to ``message`` for ``exc``: a code and a fixed message (:data:`ERROR_REPLIES`)."""
    code, text = next((c, t) for kind, c, t in ERROR_REPLIES if isinstance(exc, kind))
    return Message(Error(code=code, reason=text), reply_to=message)


def check_outgoing(reply: Message, *, check_content: bool = True) -> None:
    """Check one reply before it leaves the node.

    An error reply must carry one of the fixed (code, message) pairs; any other reply must pass
    :func:`check_reply` for its message type (unless ``check_content`` is false: apps that check
    their own content, such as the prior's SecAgg+ replies).

    Raises
    ------
    EgressViolationError
        Anything else.
    """
    if reply.has_error():
        pair = (reply.error.code, reply.error.reason)
        if pair not in _FIXED_ERRORS:
            raise EgressViolationError(f"error reply with code {reply.error.code} is not a fixed error reply")
        return
    if check_content:
        check_reply(reply.metadata.message_type, reply.content)


def describe_outgoing(message: Message) -> dict[str, Any]:
    """A JSON-able account of one outgoing message: type, error, every record's kind and keys."""
    entry: dict[str, Any] = {"type": message.metadata.message_type, "error": None, "records": {}}
    if message.has_error():
        entry["error"] = message.error.reason
        entry["code"] = message.error.code
        return entry
    for name, record in message.content.items():
        keys = sorted(record.keys()) if hasattr(record, "keys") else []
        item: dict[str, Any] = {"kind": type(record).__name__, "keys": keys}
        if isinstance(record, MetricRecord):
            item["values"] = {k: record[k] for k in keys}
        entry["records"][name] = item
    return entry


def egress_log_path(context: Context) -> Path | None:
    """Where a node audits its replies when no log is given: ``node_config["egress-log"]``, else
    ``<node_config["state-dir"]>/egress.jsonl`` (a deployed site), else nowhere."""
    for key, name in (("egress-log", ""), ("state-dir", "egress.jsonl")):
        value = context.node_config.get(key)
        if isinstance(value, str) and value:
            return Path(value) / name if name else Path(value)
    return None


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def make_egress_guard_mod(log_path: str | Path | None = None, *, check_content: bool = True) -> Mod:
    """The ClientApp mod every reply leaves through (put it first: outermost).

    1. A handler that raises gets an error reply with a code and a fixed message
       (:func:`error_reply`); the exception itself is logged on the node only.
    2. The reply is checked (:func:`check_outgoing`); one that breaks the allow-list is replaced
       by the egress-violation error reply.
    3. It is appended to the egress audit log - ``log_path``, else :func:`egress_log_path` - one
       JSON line with ``O_APPEND`` and fsync, before it is returned. If that fails, only the fixed
       "could not audit" error leaves.
    """
    fixed = Path(log_path) if log_path is not None else None

    def guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = message.metadata.message_type
        try:
            reply = call_next(message, context)
        except Exception as exc:  # everything a handler raises becomes a fixed error reply
            logger.warning("%s failed on this node: %s: %s", kind, type(exc).__name__, exc)
            reply = error_reply(message, exc)
        try:
            check_outgoing(reply, check_content=check_content)
        except EgressViolationError as exc:
            logger.error("%s: reply refused by the egress allow-list: %s", kind, exc)
            reply = error_reply(message, exc)
        path = fixed or egress_log_path(context)
        if path is not None:
            entry = {
                "ts": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                **describe_outgoing(reply),
            }
            try:
                _append_line(path, entry)
            except OSError as exc:
                logger.error("%s: cannot append to the egress audit log (%s)", path, exc)
                reply = Message(Error(code=AUDIT_FAILED[0], reason=AUDIT_FAILED[1]), reply_to=message)
        return reply

    return guard


def make_egress_audit_mod(log_path: str | Path) -> Mod:
    """:func:`make_egress_guard_mod` writing to ``log_path`` that leaves content checks to the app
    (the prior's SecAgg+ replies are checked by its own guard); error replies are still fixed."""
    return make_egress_guard_mod(log_path, check_content=False)


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
