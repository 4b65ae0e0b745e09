"""The Flower apps of ``pft bench engines --engines flower``: one virtual node per synthetic subject.

The ServerApp sends one ``train`` message to every node and waits for all replies; each node (in a
Ray actor) builds its subject's cached features and the source model (once per actor) and runs
the per-client trainer, exactly the work of the ``loop`` engine. The timed span is from the first
message sent to the last reply received (the SuperLink's and ``flwr run``'s start-up, Ray's
start-up and node registration are not in it).

Both apps are importable components (:data:`SERVER_APP`, :data:`CLIENT_APP`) run through ``flwr
run`` (:func:`pft.simulations.flower_runtime.run_flower_app`); they read the benchmark's JSON spec
from the run config's ``pft-bench-spec`` (the JSON text itself: a node on another machine of a Ray
cluster needs no file; only the ServerApp writes, on the machine that runs it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pft.core.adaptation import ModelParts
from pft.simulations.bench_work import adapt_one, make_tasks
from pft.simulations.synthetic_world import synthetic_model

#: The apps as ``flwr run`` components (``module:attribute``).
SERVER_APP = "pft.simulations.bench_flower_apps:server_app"
CLIENT_APP = "pft.simulations.bench_flower_apps:client_app"
#: The run-config key holding the benchmark's JSON spec (its text).
SPEC_KEY = "pft-bench-spec"

_PARTS: dict[int, ModelParts] = {}


def _spec(context: Context) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(str(context.run_config[SPEC_KEY]))
    return spec


client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Adapt this node's subject (partition-id k) with the per-client trainer; reply its steps."""
    spec = _spec(context)
    torch.set_num_threads(1)  # one thread per actor; ``threads`` actors share the CPU budget
    k = int(context.node_config["partition-id"])
    if spec["seed"] not in _PARTS:  # a full model per actor, loaded once
        model = synthetic_model(spec["seed"])
        _PARTS[spec["seed"]] = ModelParts(classifier=model.classifier, translator=model.translator)
    task = make_tasks(spec, range(k, k + 1))[0]
    iterations = adapt_one(spec, task, _PARTS[spec["seed"]])
    return Message(RecordDict({"metrics": MetricRecord({"iterations": iterations})}), reply_to=message)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Send ``train`` to every node, wait for all replies, write the timing beside the spec."""
    spec = _spec(context)
    wanted = int(spec["subjects"])
    deadline = time.monotonic() + 600
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < wanted and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
    t0 = time.perf_counter()
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"seed": int(spec["seed"])})}),
            dst_node_id=n,
            message_type="train",
        )
        for n in nodes
    ]
    iterations, failures = 0, 0
    for reply in grid.send_and_receive(messages, timeout=3600):
        if reply.has_error():
            failures += 1
            continue
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        iterations += int(metrics["iterations"])  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    done = {"wall_s": wall, "iterations": iterations, "failures": failures, "nodes": len(nodes)}
    (Path(spec["work_dir"]) / "flower-done.json").write_text(json.dumps(done))
