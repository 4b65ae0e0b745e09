"""Does the federated translator prior help? The experiment, run through Flower's simulation engine.

The cohort's target subjects are split (seeded) into ``participants`` - virtual nodes that opt in,
personalise T on their neutral videos and send a clipped, noised update under SecAgg+
(``client/prior_app.py``, ``server/prior_app.py``) - and HELD-OUT new subjects, who never take
part. For each noise level the federation publishes a new signed bundle ``T0' = T0 + mean update``;
then stage-3 PFT runs on every held-out subject starting from (a) the source T0 and (b) each prior,
beside source-only (no adaptation) with T0 and with the prior. Mean macro-F1 over held-out subjects
and the epsilon each participating device spent are written to ``results.json`` and ``report.md``.

Each federation runs through Flower's current runtime (:func:`pft.simulations.flower_runtime.run_flower_app`:
``flwr run`` with a SuperLink of its own in simulation mode); the apps (``pft.server.prior_app:app``,
``pft.client.prior_app:app``) read their spec from the run config's ``pft-spec``, and Flower's own
log goes to ``flower.log`` beside the spec.

    python -m pft.simulations.prior_experiment --out runs/prior --cache-dir /tmp/pftc_prior
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from pft.client.flower_app import NodeSpec
from pft.client.ledger import PrivacyBudget
from pft.client.prior_app import PRIOR_NODE_SECTION, PriorNodeSettings
from pft.core.bundle import load_bundle
from pft.core.config import FrozenConfig
from pft.core.errors import FlowerRuntimeError, SecureAggregationHaltedError
from pft.core.machine import describe_machine
from pft.core.methods import METHODS
from pft.core.metrics import macro_f1
from pft.core.models import Translator
from pft.core.prior import PriorUpdateConfig, update_release
from pft.core.seeding import subject_seed
from pft.core.signing import TrustedBundleCache, load_public_key, load_signing_key
from pft.server.prior_app import PRIOR_SERVER_SECTION, REPORT_FILE, PriorServerSpec
from pft.server.publish import publish_bundle
from pft.simulations.experiment import ExperimentConfig, PreparedExperiment, prepare_experiment
from pft.simulations.flower_engine import client_resources, simulation_keys
from pft.simulations.flower_runtime import FlowerRunSettings, run_flower_app
from pft.simulations.workspace import default_cache_root

#: The prior's apps (importable ``module:attribute`` components for ``flwr run``).
SERVER_APP = "pft.server.prior_app:app"
CLIENT_APP = "pft.client.prior_app:app"

__all__ = [
    "CLIENT_APP",
    "SERVER_APP",
    "PriorExperimentConfig",
    "PriorFederation",
    "run_prior_experiment",
    "run_prior_federation",
    "write_prior_spec",
]


class PriorExperimentConfig(FrozenConfig):
    """The prior experiment: the cohort/model (as ``pft simulate``), the split, the noise levels.

    ``noise_multipliers`` are the per-release sigmas tried (0 = no noise, epsilon infinite); each
    gives one federation and one prior. ``participants`` target subjects take part, the remaining
    targets are the held-out new subjects.
    """

    experiment: ExperimentConfig = ExperimentConfig(embedding_plot=False)
    participants: int = Field(6, ge=2)
    noise_multipliers: tuple[float, ...] = (4.0625, 1.16, 0.638, 0.0)
    clip_norm: float = Field(2.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    device_budget: float = Field(10.0, gt=0)
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.6
    clipping_range: float | None = Field(None, gt=0)
    split_seed: int = 0

    def secagg_range(self, sigma: float) -> float:
        """SecAgg+'s per-coordinate clipping range for noise ``sigma``: ``clipping_range`` if set,
        else ``C + 6 sigma C`` (at least 4), so that the noise is (almost) never clipped - a
        clipped coordinate biases the mean. One quantisation level is ``2 range / 2**22``."""
        if self.clipping_range is not None:
            return self.clipping_range
        return max(4.0, self.clip_norm * (1 + 6 * sigma))


@dataclasses.dataclass
class PriorFederation:
    """Paths of one federated-prior simulation: the spec, the server's output, the nodes' folders."""

    spec: Path
    out_dir: Path
    nodes_dir: Path
    subjects: tuple[str, ...]
    signing_key: Path
    public_key: Path


def write_prior_spec(
    prepared: PreparedExperiment,
    work: Path,
    cache_root: Path,
    subjects: tuple[str, ...],
    *,
    update: PriorUpdateConfig,
    opt_in: tuple[str, ...] | None = None,
    budget: PrivacyBudget | None = None,
    min_participants: int = 3,
    num_shares: int | float = 1.0,
    reconstruction_threshold: int | float = 0.6,
    clipping_range: float = 4.0,
    noise_seed: int | None = 0,
) -> PriorFederation:
    """Publish the stage-2 bundle (signed v1), install it on every node (verified), write the spec.

    ``subjects[k]`` is the node with ``partition-id`` k; ``opt_in`` (default: all of them) are the
    subjects that consented; every node gets the same device ``budget``. Keys and node folders
    live under ``work`` (node folders are reset).
    """
    keys = work / "keys"
    signing, public, store_key = simulation_keys(keys)
    nodes, bundle_dir, out_dir = work / "nodes", work / "bundle-v1", work / "server"
    for stale in (nodes, bundle_dir, out_dir):
        if stale.exists():
            shutil.rmtree(stale)
    publish_bundle(prepared.bundle_dir, bundle_dir, 1, load_signing_key(signing))
    trusted = load_public_key(public)
    for subject in subjects:  # each device already holds the signed bundle (pft server installs it)
        TrustedBundleCache(nodes / subject / "bundles", trusted).install(bundle_dir)
    config = prepared.config
    node = NodeSpec(
        dataset_root=Path(prepared.index.root),
        cache_root=cache_root,
        video=config.video,
        crop=config.crop,
        subjects=subjects,
        trusted_key=public,
        store_key_file=store_key,
        state_root=nodes,
        torch_threads=1,
    )
    prior_node = PriorNodeSettings(
        opt_in=subjects if opt_in is None else opt_in,
        budget=budget or PrivacyBudget(),
        noise_seed=noise_seed,
    )
    server = PriorServerSpec(
        out_dir=out_dir,
        bundle_dir=bundle_dir,
        trusted_key=public,
        signing_key=signing,
        pft=config.settings.pft,
        update=update,
        seed=config.seed,
        expected_nodes=len(subjects),
        min_participants=min_participants,
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        clipping_range=clipping_range,
    )
    spec = work / "prior_spec.json"
    spec.write_text(
        json.dumps(
            {
                "node": node.model_dump(mode="json"),
                PRIOR_NODE_SECTION: prior_node.model_dump(mode="json"),
                PRIOR_SERVER_SECTION: server.model_dump(mode="json"),
            },
            indent=1,
        )
    )
    return PriorFederation(spec, out_dir, nodes, subjects, signing, public)


def run_prior_federation(
    federation: PriorFederation,
    client_app: str = CLIENT_APP,
    *,
    run_config: Mapping[str, str] | None = None,
    python_path: Sequence[Path] = (),
    verbose: bool = False,
    run_timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Run the prior's ServerApp and ClientApp as a Flower simulation (``flwr run``, one virtual
    node per subject, 1 CPU each); return the report.

    ``client_app``: another ClientApp component, ``module:attribute`` (e.g. one whose mods record
    what leaves a node); ``run_config``: extra run-config strings it reads; ``python_path``:
    folders its module is imported from. ``verbose``: Flower's own log on the terminal too (it
    always goes to ``flower.log`` beside the spec).

    Raises
    ------
    SecureAggregationHaltedError
        The round halted (the report, with its reason, is in the server's output folder).
    FlowerRuntimeError
        The run did not complete for another reason (the message says why, with the end of
        Flower's log).
    RuntimeError
        The run completed without any report.
    """
    report_path = federation.out_dir / REPORT_FILE
    report_path.unlink(missing_ok=True)
    resources = client_resources(1)
    settings = FlowerRunSettings(
        num_supernodes=len(federation.subjects),
        num_cpus=int(resources["num_cpus"]),
        num_gpus=float(resources["num_gpus"]),
        verbose=verbose,
        run_timeout_s=run_timeout_s,
    )
    try:
        run_flower_app(
            SERVER_APP,
            client_app,
            {**(run_config or {}), "pft-spec": str(federation.spec)},
            settings,
            log_file=federation.spec.parent / "flower.log",
            python_path=python_path,
        )
    except FlowerRuntimeError as exc:
        # a halted round ends the run failed: the ServerApp raises after writing its report
        halted = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if halted.get("status") != "halted":
            raise
        raise SecureAggregationHaltedError(
            f"federated prior halted, no bundle published: {halted['reason']}"
        ) from exc
    if not report_path.is_file():
        raise RuntimeError(f"the prior simulation ended without a report ({report_path} missing)")
    report: dict[str, Any] = json.loads(report_path.read_text())
    if report["status"] != "published":
        raise SecureAggregationHaltedError(f"federated prior halted, no bundle published: {report['reason']}")
    return report


def _held_out_scores(
    prepared: PreparedExperiment, model_translator: Translator, held_out: list[str]
) -> dict[str, dict[str, float]]:
    """Source-only and PFT macro-F1 per held-out subject, starting from ``model_translator``, and
    the stage-3 steps PFT took (``pft_iterations``: does the prior make enrollment shorter?)."""
    model = dataclasses.replace(prepared.model, translator=model_translator)
    config = prepared.config
    out: dict[str, dict[str, float]] = {"source_only": {}, "pft": {}, "pft_iterations": {}}
    for subject in held_out:
        k = prepared.targets.index(subject)
        target = prepared.target(subject)
        if target is None:
            continue
        for method in ("source_only", "pft"):
            outcome = METHODS[method](model, target, config.settings, subject_seed(config.seed, k))
            pred = outcome.logits.argmax(1).numpy()
            out[method][subject] = macro_f1(target.eval.labels.numpy(), pred, len(prepared.classes))
            if method == "pft":
                out["pft_iterations"][subject] = float(outcome.iterations)
    return out


def _summary(per_subject: dict[str, float]) -> dict[str, float]:
    values = list(per_subject.values())
    return {
        "mean_f1": statistics.fmean(values),
        "std_f1": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def run_prior_experiment(
    config: PriorExperimentConfig,
    out_dir: Path,
    cache_root: Path | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Build the prior from the participants at each noise level; score PFT on held-out subjects.

    Returns the results (also written to ``out_dir/results.json``, with ``report.md`` and
    ``config.json``).
    """
    t_start = time.perf_counter()
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    config.write_json(out_dir / "config.json")
    experiment = config.experiment.resolved()
    prepared = prepare_experiment(experiment, cache_root, log=log)
    ready = [s for s in prepared.targets if prepared.target(s) is not None]
    if len(ready) <= config.participants:
        raise ValueError(
            f"{len(ready)} usable target subjects: need more than participants={config.participants}"
        )
    order = sorted(ready)
    random.Random(config.split_seed).shuffle(order)
    participants, held_out = tuple(sorted(order[: config.participants])), sorted(order[config.participants :])
    log(f"prior: {len(participants)} participants, {len(held_out)} held-out new subjects")
    t0_bundle = load_bundle(prepared.bundle_dir)
    rows: list[dict[str, Any]] = []
    base = _held_out_scores(prepared, t0_bundle.translator, held_out)
    rows.append(
        {
            "start": "source T0",
            "noise_multiplier": None,
            "epsilon_per_device": 0.0,
            "pft": _summary(base["pft"]),
            "pft_mean_iterations": statistics.fmean(base["pft_iterations"].values()),
            "source_only": _summary(base["source_only"]),
            "per_subject": base,
        }
    )
    for sigma in config.noise_multipliers:
        update = PriorUpdateConfig(clip_norm=config.clip_norm, noise_multiplier=sigma, delta=config.delta)
        release = update_release(update)
        budget = PrivacyBudget(epsilon=math.inf if math.isinf(release.epsilon) else config.device_budget)
        name = "no_noise" if sigma == 0 else f"sigma_{sigma:g}"
        federation = write_prior_spec(
            prepared,
            out_dir / "federation" / name,
            cache_root,
            participants,
            update=update,
            budget=budget,
            num_shares=config.num_shares,
            reconstruction_threshold=config.reconstruction_threshold,
            clipping_range=config.secagg_range(sigma),
            noise_seed=config.split_seed,
        )
        t_fed = time.perf_counter()
        report = run_prior_federation(federation)
        seconds = time.perf_counter() - t_fed
        prior = load_bundle(report["bundle_dir"])
        scores = _held_out_scores(prepared, prior.translator, held_out)
        rows.append(
            {
                "start": f"federated prior (sigma {sigma:g})",
                "noise_multiplier": sigma,
                "epsilon_per_device": release.epsilon,
                "survivors": report["survivors"],
                "bundle_version": report["bundle_version"],
                "mean_update_norm": report["mean_update_norm"],
                "secagg_clipping_range": config.secagg_range(sigma),
                "federation_seconds": round(seconds, 1),
                "pft": _summary(scores["pft"]),
                "pft_mean_iterations": statistics.fmean(scores["pft_iterations"].values()),
                "source_only": _summary(scores["source_only"]),
                "per_subject": scores,
            }
        )
        log(f"{name}: eps {release.epsilon:.2f}, held-out PFT F1 {rows[-1]['pft']['mean_f1']:.2f}")
    results: dict[str, Any] = {
        "profile": experiment.profile,
        "seed": experiment.seed,
        "participants": list(participants),
        "held_out": held_out,
        "clip_norm": config.clip_norm,
        "delta": config.delta,
        "privacy_unit": "person",
        "rows": rows,
        "machine": describe_machine(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(prior_report_markdown(results))
    return results


def prior_report_markdown(results: dict[str, Any]) -> str:
    """The experiment's table: starting point, epsilon per device, held-out source-only and PFT F1."""
    lines = [
        "# Federated translator prior",
        "",
        f"{len(results['participants'])} participating subjects build the prior (SecAgg+, local DP, "
        f"clip {results['clip_norm']}, delta {results['delta']:g}, privacy unit: person); "
        f"{len(results['held_out'])} held-out NEW subjects are scored. Profile {results['profile']}, "
        f"seed {results['seed']}; {results['seconds']} s.",
        "",
        "| starting point | epsilon per device | source-only F1 | PFT F1 (mean +- std) | PFT steps (mean) |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        eps = row["epsilon_per_device"]
        eps_text = "-" if row["noise_multiplier"] is None else ("inf" if math.isinf(eps) else f"{eps:.2f}")
        lines.append(
            f"| {row['start']} | {eps_text} | {row['source_only']['mean_f1']:.2f} | "
            f"{row['pft']['mean_f1']:.2f} +- {row['pft']['std_f1']:.2f} | {row['pft_mean_iterations']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry: ``python -m pft.simulations.prior_experiment --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--targets", type=int, default=None)
    args = parser.parse_args()
    config = PriorExperimentConfig(
        experiment=ExperimentConfig(target_subjects=args.targets, embedding_plot=False),
        participants=args.participants,
    )
    torch.set_num_threads(1)
    results = run_prior_experiment(config, args.out, args.cache_dir, log=print)
    print(prior_report_markdown(results))


if __name__ == "__main__":
    main()
