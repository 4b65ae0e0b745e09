"""One exchange with many nodes over ``grid.send_and_receive``: quorum, timeout, checked replies.

FedAvg does not fit personalisation (nothing but metrics comes back), so the ServerApp runs its
own loop. Every reply is checked against the egress allow-list's schema (``pft.client.egress``:
exactly the message type's keys, each finite and in range) and against who the node said it was
(:class:`NodeIdentities`): error replies, missing replies, malformed ones and a node claiming
another's subject are counted as failures with a reason and logged, never aggregated - and no
reply, however malformed, can raise out of :func:`exchange` (docs/reliability.md cases 7-9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from pft.client.egress import check_reply
from pft.core.errors import PFTError

logger = logging.getLogger("pft.server")

#: Longest error text from a node kept in results and the audit log (a node's fixed messages are
#: far shorter; anything longer is cut, and control characters are replaced).
MAX_REASON_CHARS = 200


class QuorumError(PFTError):
    """Fewer nodes than the minimum connected or answered in time; the run is abandoned."""


class ReplyIdentityError(PFTError):
    """A node's reply claims a subject index it does not hold (another node's, or out of range)."""


class NodeIdentities:
    """Which node speaks for which person (``subject-index``): the first valid claim binds both ways.

    Parameters
    ----------
    subjects:
        How many subjects the spec lists (indices must be below it), or None when it lists none.
    """

    def __init__(self, subjects: int | None = None) -> None:
        self.subjects = subjects
        self.by_node: dict[int, int] = {}
        self.by_index: dict[int, int] = {}

    def check(self, node: int, metrics: dict[str, float]) -> None:
        """Accept ``node``'s claim in ``metrics["subject-index"]`` or raise :class:`ReplyIdentityError`."""
        index = int(metrics["subject-index"])
        if self.subjects is not None and index >= self.subjects:
            raise ReplyIdentityError(f"subject-index {index} is outside the spec's {self.subjects} subjects")
        if self.by_node.get(node, index) != index:
            raise ReplyIdentityError(
                f"node {node} now claims subject-index {index}, earlier {self.by_node[node]}"
            )
        holder = self.by_index.get(index, node)
        if holder != node:
            raise ReplyIdentityError(f"subject-index {index} is already held by node {holder}")
        self.by_node[node], self.by_index[index] = index, node


def _plain_reason(text: object) -> str:
    """A node's error text made safe to log: printable, one line, bounded."""
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean if len(clean) <= MAX_REASON_CHARS else clean[:MAX_REASON_CHARS] + "..."


@dataclass
class Exchange:
    """The outcome of one message type sent to a set of nodes."""

    message_type: str
    replies: dict[int, dict[str, float]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    def require(self, min_nodes: int) -> None:
        """Raise :class:`QuorumError` if fewer than ``min_nodes`` nodes answered validly."""
        if len(self.replies) < min_nodes:
            raise QuorumError(
                f"{self.message_type}: {len(self.replies)} valid repl(ies), quorum is {min_nodes}; "
                f"failures: {self.failures}"
            )


def wait_for_nodes(grid: Grid, wanted: int, min_nodes: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Wait until ``wanted`` nodes are connected, or ``timeout`` seconds; then require ``min_nodes``.

    Raises
    ------
    QuorumError
        Fewer than ``min_nodes`` nodes after ``timeout`` seconds (docs/reliability.md case 8: no hang).
    """
    deadline = time.monotonic() + timeout
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(poll)
        nodes = sorted(grid.get_node_ids())
    if len(nodes) < min_nodes:
        raise QuorumError(f"{len(nodes)} node(s) connected within {timeout:.0f} s, quorum is {min_nodes}")
    logger.info("%d node(s) connected", len(nodes))
    return nodes


def exchange(
    grid: Grid,
    node_ids: Iterable[int],
    message_type: str,
    content: Callable[[int], RecordDict],
    timeout: float,
    log: Callable[[str], None] = logger.warning,
    validate: Callable[[int, dict[str, float]], None] | None = None,
) -> Exchange:
    """Send ``content(node)`` to every node, collect replies for up to ``timeout`` s, check them.

    Each reply is checked against the allow-list schema and then ``validate(node, metrics)``
    (e.g. :meth:`NodeIdentities.check`); any failure - an error reply, a malformed reply, a
    refused claim, a reply from a node that was not asked, a second reply - is a failure of that
    node with its reason, never an exception.
    """
    nodes = list(node_ids)
    outcome = Exchange(message_type)
    t0 = time.monotonic()
    messages = [Message(content(n), dst_node_id=n, message_type=message_type) for n in nodes]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        try:
            node = int(reply.metadata.src_node_id)
        except Exception:  # a reply without a usable sender cannot be attributed
            log(f"{message_type}: a reply without a sender was dropped")
            continue
        try:
            if node not in nodes or node in outcome.replies or node in outcome.failures:
                raise ReplyIdentityError(f"unexpected reply from node {node}")
            if reply.has_error():
                outcome.failures[node] = _plain_reason(f"error {reply.error.code}: {reply.error.reason}")
                continue
            metrics = check_reply(message_type, reply.content)
            if validate is not None:
                validate(node, metrics)
            outcome.replies[node] = metrics
        except Exception as exc:  # one bad reply never stops the exchange (or the ServerApp)
            if node in nodes and node not in outcome.replies:
                outcome.failures.setdefault(node, _plain_reason(f"rejected: {exc}"))
            else:
                log(f"{message_type}: dropped a reply from node {node} ({_plain_reason(exc)})")
    for node in nodes:
        if node not in outcome.replies and node not in outcome.failures:
            outcome.failures[node] = f"no reply within {timeout:.0f} s"
    outcome.seconds = time.monotonic() - t0
    for node, reason in sorted(outcome.failures.items()):
        log(f"{message_type}: node {node} failed ({reason})")
    return outcome
