"""Flower messages as a node receives them (tests that call app handlers without a federation), and
the ClientApps of the Flower engine's and the federated prior's tests as importable components."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from pft.client.egress import make_egress_audit_mod, make_egress_guard_mod
from pft.client.flower_app import evaluate, install, make_client_app, node_from_context, query, train
from pft.client.prior_app import make_prior_client_app


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


# --- ClientApps the Flower engine's tests run through `flwr run` (importable components) ----------
# `run_flower_simulation(..., client_app="flower_support:audited_app", python_path=[TESTS])` (and
# `run_prior_federation(..., client_app="flower_support:prior_recorded_app", ...)`): the simulation
# imports this module by name, so everything an app needs comes from its run config.
TESTS = Path(__file__).resolve().parent
#: run-config key naming the JSON-lines file the egress audit appends every reply to
AUDIT_KEY = "egress-audit"


def _audit_from_run_config(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The egress audit (:func:`make_egress_audit_mod`) writing to the run config's ``egress-audit``."""
    return make_egress_audit_mod(str(context.run_config[AUDIT_KEY]))(message, context, call_next)


def _hostile(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Node 1's own modified app: its evaluate replies claim node 0's person, come back empty, or
    absurd - outside any node-side guard, as a hostile site would send them."""
    reply = call_next(message, context)
    if int(context.node_config.get("partition-id", 0)) != 1 or message.metadata.message_type != "evaluate":
        return reply
    method = str(message.content["config"]["method"])
    metrics = dict(reply.content["metrics"])
    if method == "source_only":
        metrics["subject-index"] = 0.0  # another node's subject
    elif method == "pft":
        metrics = {}  # an empty metrics reply (used to crash the ServerApp with a KeyError)
    else:
        metrics["adapt-iterations"] = 1e300
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


#: The app with every reply recorded (inside the egress guard).
audited_app = make_client_app(mods=[_audit_from_run_config])

#: The hostile site's app: its mod sits outside the egress guard.
hostile_app = ClientApp(mods=[_hostile, make_egress_guard_mod()])
hostile_app.query()(query)
hostile_app.train("install")(install)
hostile_app.train()(train)
hostile_app.evaluate()(evaluate)


def make_recorder(name: str) -> Mod:
    """A mod writing each reply's arrays / SecAgg+ masked vector of a node to ``<state dir>/NAME.jsonl``."""

    def record(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        node = node_from_context(context)
        entry: dict[str, Any] = {
            "type": message.metadata.message_type,
            "records": sorted(reply.content.keys()),
        }
        if not reply.has_error():
            for rec in reply.content.values():
                if isinstance(rec, ArrayRecord) and len(rec) > 0:
                    entry["arrays"] = [a.numpy().tolist() for a in rec.values()]
                if isinstance(rec, ConfigRecord) and "masked_params" in rec:
                    from flwr.common import bytes_to_ndarray

                    blobs: list[bytes] = rec["masked_params"]  # type: ignore[assignment]
                    entry["masked"] = [bytes_to_ndarray(b).tolist() for b in blobs]
        with (node.state_dir / f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return record


#: The prior's app with what leaves each node audited (run config ``egress-audit``) and recorded
#: (``sent.jsonl``), and the plaintext update before SecAgg+ masks it (``plain.jsonl``).
prior_recorded_app = make_prior_client_app(
    mods=[_audit_from_run_config, make_recorder("sent")],
    inner_mods=[make_recorder("plain")],
)
