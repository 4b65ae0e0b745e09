"""One exchange with many nodes over ``grid.send_and_receive``: quorum, timeout, checked replies.

FedAvg does not fit personalisation (nothing but metrics comes back), so the ServerApp runs its
own loop. Every reply is checked against the egress allow-list (``pft.client.egress``): error
replies, missing replies and replies with NaN/Inf/negative values or unknown keys are counted as
failures and logged, never aggregated (docs/reliability.md cases 7-9).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from pft.client.egress import EgressViolationError, check_reply
from pft.core.errors import PFTError

logger = logging.getLogger("pft.server")


class QuorumError(PFTError):
    """Fewer nodes than the minimum connected or answered in time; the run is abandoned."""


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
) -> Exchange:
    """Send ``content(node)`` to every node, collect replies for up to ``timeout`` s, check them."""
    nodes = list(node_ids)
    outcome = Exchange(message_type)
    t0 = time.monotonic()
    messages = [Message(content(n), dst_node_id=n, message_type=message_type) for n in nodes]
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            outcome.failures[node] = f"error {reply.error.code}: {reply.error.reason}"
        else:
            try:
                outcome.replies[node] = check_reply(message_type, reply.content)
            except EgressViolationError as exc:
                outcome.failures[node] = f"rejected: {exc}"
    for node in nodes:
        if node not in outcome.replies and node not in outcome.failures:
            outcome.failures[node] = f"no reply within {timeout:.0f} s"
    outcome.seconds = time.monotonic() - t0
    for node, reason in sorted(outcome.failures.items()):
        log(f"{message_type}: node {node} failed ({reason})")
    return outcome
