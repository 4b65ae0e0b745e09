"""The Flower ServerApp: publish a signed bundle, run personalisation rounds, aggregate metrics.

``main(grid, context)``: read the :class:`ServerSpec` (the ``"server"`` section of the JSON named
by ``run_config["pft-spec"]`` or ``$PFT_FLOWER_SPEC``) -> verify the signed bundle -> wait for the
nodes (quorum ``min_nodes``) -> ``query`` which nodes already hold the bundle's digest and send it
(``train.install``) to the others -> per round, ``train`` (each node adapts T on its own neutral
videos) then, where nodes have labelled data, ``evaluate`` each method -> write results.json and
report.md in the same format as ``pft simulate`` (:mod:`pft.core.results`).

From the last round's ``train`` replies the results also say which nodes fell back from landmark
to random pairing (``federation.pairing_fallback``) and, with DP on, the privacy summary of PFT
(``methods.pft.privacy``, as ``pft simulate`` writes it) and each node's ledger total
(``federation.privacy_ledger``: cumulative epsilon per subject).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from pydantic import Field

from pft.client.wire import BUNDLE_RECORD, CONFIG_RECORD, SPEC_ENV
from pft.core.config import FrozenConfig
from pft.core.machine import describe_machine
from pft.core.personalize import PersonalizeConfig
from pft.core.privacy import DPConfig, summarise_releases
from pft.core.results import markdown_table, plot_per_subject, summarise_method, write_results
from pft.core.signing import bundle_digest, load_public_key
from pft.server.audit import AuditLog, RunAudit
from pft.server.publish import bundle_arrays
from pft.server.rounds import Exchange, NodeIdentities, QuorumError, exchange, wait_for_nodes

logger = logging.getLogger("pft.server")


class ServerSpec(FrozenConfig):
    """What the ServerApp runs: the signed bundle, the nodes, the rounds and where results go."""

    out_dir: Path
    bundle_dir: Path
    trusted_key: Path
    methods: tuple[str, ...] = ("pft",)
    seed: int = Field(0, ge=0)
    pft: PersonalizeConfig = PersonalizeConfig()
    method_settings: dict[str, Any] = Field(default_factory=dict)
    subjects: tuple[str, ...] = ()
    expected_nodes: int | None = Field(None, ge=1)
    min_nodes: int = Field(1, ge=1)
    rounds: int = Field(1, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(120.0, gt=0)
    evaluate: bool = True
    results_meta: dict[str, Any] = Field(default_factory=dict)
    audit_log: Path | None = None


def load_server_spec(context: Context) -> ServerSpec:
    """The spec named by ``run_config["pft-spec"]``, else ``$PFT_FLOWER_SPEC``."""
    value = context.run_config.get("pft-spec")
    path = value if isinstance(value, str) and value else os.environ.get(SPEC_ENV, "")
    if not path:
        raise ValueError(f"no server spec: set run_config 'pft-spec' or ${SPEC_ENV}")
    return ServerSpec.model_validate(json.loads(Path(path).read_text())["server"])


def _same_config(values: dict[str, Any], bundle: ArrayRecord | None = None) -> Callable[[int], RecordDict]:
    """Message content for every node: one ConfigRecord (and the bundle's files, if given)."""

    def content(_node: int) -> RecordDict:
        records: dict[str, Any] = {CONFIG_RECORD: ConfigRecord(values)}
        if bundle is not None:
            records[BUNDLE_RECORD] = bundle
        return RecordDict(records)

    return content


def _subject(spec: ServerSpec, metrics: dict[str, float], node: int) -> str:
    index = int(metrics.get("subject-index", -1))
    return spec.subjects[index] if 0 <= index < len(spec.subjects) else f"node-{node}"


def node_release(dp: DPConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """A node's DP release as ``DPRelease.summary`` names its fields, from its ``train`` reply's
    numbers and the DP settings the server sent (unit, accountant, delta, clipping norm)."""
    return {
        "privacy_unit": dp.privacy_unit,
        "accountant": dp.accountant,
        "delta": dp.delta,
        "max_grad_norm": dp.max_grad_norm,
        "epsilon": metrics["dp-epsilon"],
        "noise_multiplier": metrics["dp-noise-multiplier"],
        "sample_rate": metrics["dp-sample-rate"],
        "steps": int(metrics["dp-steps"]),
        "group_size": int(metrics.get("dp-group-size", 1)),
        "group_epsilon": metrics.get("dp-group-epsilon"),
    }


def run_federation(grid: Grid, spec: ServerSpec, audit: RunAudit | None = None) -> dict[str, Any]:
    """Run the whole personalisation federation and write its results; returns the results dict.

    ``audit``: where each step is recorded (``pft.server.audit``); default: ``spec.audit_log``, run 0.
    """
    audit = audit or RunAudit(AuditLog(spec.audit_log) if spec.audit_log else None, 0)
    t_start = time.monotonic()
    public_key = load_public_key(spec.trusted_key)
    arrays, manifest = bundle_arrays(spec.bundle_dir, public_key)
    digest, version = bundle_digest(manifest), int(manifest["bundle_version"])
    audit.event(
        "run.started",
        bundle_version=version,
        bundle_digest=digest,
        min_nodes=spec.min_nodes,
        rounds=spec.rounds,
    )
    nodes = wait_for_nodes(
        grid, spec.expected_nodes or spec.min_nodes, spec.min_nodes, spec.connect_timeout_s
    )
    audit.event("run.nodes", nodes=nodes)
    history: list[Exchange] = []
    # who speaks for which person: a node claiming another's subject index is refused
    identities = NodeIdentities(len(spec.subjects) or None)

    config = _same_config

    def ask(nodes_: list[int], kind: str, content: Callable[[int], RecordDict]) -> Exchange:
        return exchange(grid, nodes_, kind, content, spec.round_timeout_s, validate=identities.check)

    asked = ask(nodes, "query", config({"bundle-digest": digest}))
    history.append(asked)
    audit.exchange(0, asked)
    asked.require(spec.min_nodes)
    have = [n for n, m in asked.replies.items() if m["bundle-current"] == 1.0]
    need = [n for n in asked.replies if n not in have]
    if need:
        sent = ask(need, "train.install", config({"bundle-version": version}, arrays))
        history.append(sent)
        audit.exchange(0, sent)
        have += [n for n, m in sent.replies.items() if int(m["bundle-version"]) == version]
    active = sorted(have)
    logger.info("bundle v%d (%s) on %d node(s)", version, digest[:12], len(active))

    per_method: dict[str, dict[str, dict[str, float]]] = {m: {} for m in spec.methods}
    costs: dict[str, list[tuple[float, float]]] = {m: [] for m in spec.methods}
    last_train: dict[str, dict[str, float]] = {}
    for round_no in range(1, spec.rounds + 1):
        if len(active) < spec.min_nodes:
            raise QuorumError(
                f"round {round_no}: {len(active)} node(s) hold the bundle, quorum is {spec.min_nodes}"
            )
        trained = ask(
            active,
            "train",
            config({"pft-config": spec.pft.model_dump_json(), "seed": spec.seed, "round": round_no}),
        )
        history.append(trained)
        audit.exchange(round_no, trained)
        trained.require(spec.min_nodes)
        active = sorted(trained.replies)
        last_train = {_subject(spec, m, n): m for n, m in trained.replies.items()}
        if not spec.evaluate:
            continue
        per_method = {m: {} for m in spec.methods}
        costs = {m: [] for m in spec.methods}
        for method in spec.methods:
            scored = ask(
                active,
                "evaluate",
                config(
                    {
                        "method": method,
                        "seed": spec.seed,
                        "method-settings": json.dumps(spec.method_settings),
                    }
                ),
            )
            history.append(scored)
            audit.exchange(round_no, scored)
            scored.require(spec.min_nodes)
            for node, metrics in scored.replies.items():
                per_method[method][_subject(spec, metrics, node)] = {
                    "f1": metrics["f1"],
                    "accuracy": metrics["accuracy"],
                }
                costs[method].append((metrics["adapt-iterations"], metrics["adapt-seconds"]))

    results: dict[str, Any] = dict(spec.results_meta)
    results.update(
        {
            "engine": "flower",
            "seed": spec.seed,
            "machine": describe_machine(),
            "methods": {
                m: summarise_method(
                    dict(sorted(per_method[m].items())),
                    statistics.fmean(c[0] for c in costs[m]) if costs[m] else 0.0,
                    statistics.fmean(c[1] for c in costs[m]) if costs[m] else 0.0,
                )
                for m in spec.methods
                if per_method[m]
            },
            "bundle": {"dir": str(spec.bundle_dir), "version": version, "digest": digest},
            "federation": {
                "nodes": len(nodes),
                "completed": len(active),
                "min_nodes": spec.min_nodes,
                "rounds": spec.rounds,
                "pairing_fallback": sorted(s for s, m in last_train.items() if m.get("pairing-fallback")),
                "exchanges": [
                    {
                        "type": e.message_type,
                        "ok": len(e.replies),
                        "failed": {str(k): v for k, v in sorted(e.failures.items())},
                        "seconds": round(e.seconds, 2),
                    }
                    for e in history
                ],
            },
            "timings_s": {"federation": round(time.monotonic() - t_start, 2)},
        }
    )
    dp = spec.pft.dp
    releases = {s: node_release(dp, m) for s, m in sorted(last_train.items()) if dp and "dp-epsilon" in m}
    if releases:
        if "pft" in results["methods"]:
            results["methods"]["pft"]["privacy"] = summarise_releases(releases)
        results["federation"]["privacy_ledger"] = {
            s: m["dp-cumulative-epsilon"]
            for s, m in sorted(last_train.items())
            if "dp-cumulative-epsilon" in m
        }
    write_report(spec.out_dir, results)
    return results


def write_report(out_dir: Path, results: dict[str, Any]) -> Path:
    """results.json, report.md (the paper-style table) and the per-subject plot in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir, results)
    lines = [f"# SFDA-PFT on Flower ({results.get('profile', 'deployment')}, seed {results['seed']})", ""]
    if results["methods"]:
        bars = plot_per_subject(results, out_dir / "per_subject_f1.png")
        lines += [
            "Macro-F1 (%) per person on held-out labelled videos, measured on each node; only "
            "allow-listed metrics left the nodes.",
            "",
            markdown_table(results),
            "",
            f"![per-subject F1]({bars.name})",
            "",
        ]
    federation = results["federation"]
    privacy = results["methods"].get("pft", {}).get("privacy")
    if privacy:
        lines += [
            f"PFT ran with DP-SGD: epsilon <= {privacy['epsilon']:.3g} per {privacy['privacy_unit']} at "
            f"delta {privacy['delta']:g} ({privacy['accountant']}), written to every node's privacy ledger.",
            "",
        ]
    if federation.get("pairing_fallback"):
        lines += [
            f"Landmark pairing fell back to random pairing (no landmarks) on: "
            f"{', '.join(federation['pairing_fallback'])}.",
            "",
        ]
    lines += [
        f"{federation['completed']}/{federation['nodes']} node(s) completed {federation['rounds']} round(s) "
        f"(quorum {federation['min_nodes']}); bundle v{results['bundle']['version']} "
        f"`{results['bundle']['digest'][:16]}`.",
        "",
        "| exchange | ok | failed | seconds |",
        "|---|---|---|---|",
    ]
    for e in federation["exchanges"]:
        lines.append(f"| `{e['type']}` | {e['ok']} | {len(e['failed'])} | {e['seconds']} |")
    failures = [
        (e["type"], node, reason) for e in federation["exchanges"] for node, reason in e["failed"].items()
    ]
    if failures:  # why a site failed belongs in the report, not only in the audit log
        lines += ["", "Failures (node id: reason as the node or the server gave it):", ""]
        lines += [f"- `{kind}`, node {node}: {reason}" for kind, node, reason in failures]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point (Flower Message API); the run's end is audited either way."""
    spec = load_server_spec(context)
    audit = RunAudit(AuditLog(spec.audit_log) if spec.audit_log else None, int(context.run_id))
    try:
        results = run_federation(grid, spec, audit)
    except BaseException as exc:
        audit.event("run.finished", status="failed", reason=f"{type(exc).__name__}: {exc}", completed=0)
        raise
    audit.event("run.finished", status="completed", reason="", completed=results["federation"]["completed"])
