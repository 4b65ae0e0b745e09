"""Flower messages as a node receives them, for tests that call app handlers without a federation."""

from __future__ import annotations

import time

from flwr.app import Message, Metadata, RecordDict


def incoming(content: RecordDict, message_type: str) -> Message:
    """A message as a node receives it (metadata filled in, as the SuperNode does)."""
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=1,
        dst_node_id=11,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]
