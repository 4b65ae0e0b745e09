"""The opt-in federated translator prior, server side: Flower SecAgg+ through the legacy API.

``main(grid, context)``: read the :class:`PriorServerSpec` (section ``prior_server`` of the JSON
named by ``run_config["pft-spec"]`` or ``$PFT_FLOWER_SPEC``) -> verify the signed bundle holding
T0 -> ask every node for consent (``get_properties``; a node that did not opt in answers that and
nothing else) -> one SecAgg+ round (``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``)
over the consenting nodes, each sending a clipped, noised update of T's trainable tensors with
weight 1 -> the strategy receives ONLY the reconstructed mean over the survivors, validates it
(finite, T's shapes) -> ``T0' = T0 + mean`` is written into a new bundle published and signed as
version ``v + 1`` -> ``prior_report.json`` (participants, survivors, SecAgg+ stages, epsilon per
device, the new version).

Threat model: honest-but-curious server; SecAgg+ hides each update (the server learns the sum
only, as long as fewer than ``reconstruction_threshold`` nodes collude with it); every update is
already differentially private on its device (local DP), so even the sum protects each person.

Too few consenting nodes or survivors: a CLEAN halt - no bundle is published, the report says
``"status": "halted"`` and why, and :class:`~pft.core.errors.SecureAggregationHaltedError` is raised
(the run ends failed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from pydantic import Field

from pft.client.wire import OPT_IN_KEY, SPEC_ENV
from pft.core.adaptation import ModelParts
from pft.core.atomic import atomic_write_text
from pft.core.bundle import Bundle, load_bundle, save_bundle
from pft.core.config import FrozenConfig
from pft.core.errors import InvalidPriorUpdateError, SecureAggregationHaltedError
from pft.core.models import Translator
from pft.core.personalize import PersonalizeConfig
from pft.core.prior import (
    PriorUpdateConfig,
    apply_prior,
    check_update,
    trainable_names,
    update_norm,
    update_release,
)
from pft.core.signing import bundle_digest, load_public_key, load_signing_key, verify_bundle
from pft.server.publish import publish_bundle

logger = logging.getLogger("pft.server.prior")

PRIOR_SERVER_SECTION = "prior_server"
REPORT_FILE = "prior_report.json"


class PriorServerSpec(FrozenConfig):
    """One federated-prior round: the bundle, the update's DP settings, SecAgg+ and quorum.

    ``num_shares``/``reconstruction_threshold`` as Flower's ``SecAggPlusWorkflow`` (an int, or a
    float fraction of the sampled nodes / of the shares). ``clipping_range`` bounds each
    coordinate of an update before quantisation into ``quantization_range`` levels (the per-node
    rounding error is at most ``2 clipping_range / quantization_range`` per coordinate).
    """

    out_dir: Path
    bundle_dir: Path
    trusted_key: Path
    signing_key: Path
    pft: PersonalizeConfig = PersonalizeConfig()
    update: PriorUpdateConfig = PriorUpdateConfig(epsilon=4.0)
    seed: int = Field(0, ge=0)
    expected_nodes: int = Field(..., ge=2)
    min_participants: int = Field(3, ge=2)
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.6
    clipping_range: float = Field(4.0, gt=0)
    quantization_range: int = Field(2**22, ge=2)
    timeout_s: float | None = Field(600.0, gt=0)
    connect_timeout_s: int = Field(120, ge=1)


def load_prior_spec(context: Context) -> PriorServerSpec:
    """The spec named by ``run_config["pft-spec"]``, else ``$PFT_FLOWER_SPEC``."""
    value = context.run_config.get("pft-spec")
    path = value if isinstance(value, str) and value else os.environ.get(SPEC_ENV, "")
    if not path:
        raise ValueError(f"no prior spec: set run_config 'pft-spec' or ${SPEC_ENV}")
    return PriorServerSpec.model_validate(json.loads(Path(path).read_text())[PRIOR_SERVER_SECTION])


def update_names(bundle: Bundle, pft: PersonalizeConfig) -> tuple[str, ...]:
    """State-dict names of the tensors stage 3 trains (what a device's update holds)."""
    parts = ModelParts(
        classifier=bundle.classifier,
        translator=bundle.translator,
        style_target=torch.zeros(1),
        style_reference=torch.zeros(1),
    )
    return trainable_names(bundle.translator, pft.method().trainable_parameters(parts))


class PriorStrategy(Strategy):
    """Consent query, one SecAgg+ fit round over the consenting nodes, validated mean update.

    It never sees an individual update: Flower's SecAgg+ workflow hands ``aggregate_fit`` the
    reconstructed weighted mean (every weight is 1) as each result's parameters.
    """

    def __init__(
        self, spec: PriorServerSpec, names: tuple[str, ...], t0: dict[str, torch.Tensor], digest: str
    ):
        self.spec = spec
        self.names = names
        self.t0 = t0
        self.digest = digest
        self.asked = 0
        self.opted_in = 0
        self.sampled = 0
        self.survivors = 0
        self.failures = 0
        self.halt_reason: str | None = None
        self.mean_update: dict[str, torch.Tensor] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """T0's trainable tensors (the server's own: no node is asked for parameters)."""
        return ndarrays_to_parameters([self.t0[n].numpy() for n in self.names])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Ask every node for consent; send fit instructions to those that opted in (quorum)."""
        if not client_manager.wait_for(self.spec.expected_nodes, timeout=self.spec.connect_timeout_s):
            self.halt_reason = (
                f"only {client_manager.num_available()} of {self.spec.expected_nodes} node(s) "
                f"connected within {self.spec.connect_timeout_s} s"
            )
            return []
        proxies = list(client_manager.all().values())
        self.asked = len(proxies)
        chosen: list[ClientProxy] = []
        for proxy in proxies:
            res = proxy.get_properties(
                GetPropertiesIns({}), timeout=self.spec.timeout_s, group_id=server_round
            )
            if int(res.properties.get(OPT_IN_KEY, 0)) == 1:
                chosen.append(proxy)
        self.opted_in = len(chosen)
        if len(chosen) < self.spec.min_participants:
            self.halt_reason = (
                f"only {len(chosen)} of {len(proxies)} node(s) opted in; "
                f"at least {self.spec.min_participants} are needed"
            )
            return []
        config: dict[str, Scalar] = {
            "bundle-digest": self.digest,
            "update-names": json.dumps(list(self.names)),
            "prior-update": self.spec.update.model_dump_json(),
            "pft-config": self.spec.pft.model_dump_json(),
            "seed": self.spec.seed,
        }
        self.sampled = len(chosen)
        return [(p, FitIns(parameters, config)) for p in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate the SecAgg+ mean (finite, T's shapes) and keep it as the prior's update."""
        self.survivors = len(results)
        self.failures = len(failures)
        if not results:
            self.halt_reason = "no update survived secure aggregation"
            return None, {}
        arrays: NDArrays = parameters_to_ndarrays(results[0][1].parameters)
        if len(arrays) != len(self.names):
            self.halt_reason = f"the aggregate holds {len(arrays)} tensors, expected {len(self.names)}"
            return None, {}
        mean = {
            n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy())
            for n, a in zip(self.names, arrays, strict=True)
        }
        try:
            check_update(mean, {n: tuple(self.t0[n].shape) for n in self.names})
        except InvalidPriorUpdateError as exc:
            self.halt_reason = f"the aggregate was refused: {exc}"
            return None, {}
        self.mean_update = mean
        return ndarrays_to_parameters(arrays), {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No federated evaluation in the prior's run."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralised evaluation (the server holds no data)."""
        return None


class ReportingSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, recording each stage's sampled and active node counts, so a
    halt ("Secure aggregation halted.", which Flower only logs) becomes a reported reason."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages: list[dict[str, Any]] = []

    def _trace(self, stage: str, ok: bool, state: WorkflowState) -> bool:
        self.stages.append(
            {
                "stage": stage,
                "ok": bool(ok),
                "sampled": len(state.sampled_node_ids),
                "active": len(state.active_node_ids),
                "threshold": int(state.threshold),
                "num_shares": int(state.num_shares),
            }
        )
        return ok

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._trace("setup", super().setup_stage(grid, context, state), state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._trace("share_keys", super().share_keys_stage(grid, context, state), state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._trace(
            "collect_masked_vectors", super().collect_masked_vectors_stage(grid, context, state), state
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return self._trace("unmask", super().unmask_stage(grid, context, state), state)


def publish_prior(
    bundle: Bundle, state: dict[str, torch.Tensor], destination: Path, signing_key: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the bundle with T0 replaced by ``state`` and publish it signed as version ``v + 1``."""
    translator = Translator(bundle.model_config)
    translator.load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory(prefix=".prior-", dir=destination.parent) as tmp:
        staging = Path(tmp) / "bundle"
        save_bundle(
            staging,
            extractor=bundle.extractor,
            classifier=bundle.classifier,
            translator=translator,
            normalizer=bundle.normalizer,
            model_config=bundle.model_config,
            class_names=bundle.class_names,
            source_styles=bundle.source_styles,
            descriptors=bundle.descriptors,
            bundle_version=bundle.bundle_version + 1,
            extra={**bundle.extra, "federated_prior": meta},
        )
        return publish_bundle(staging, destination, bundle.bundle_version + 1, load_signing_key(signing_key))


def _halt_reason(strategy: PriorStrategy, workflow: ReportingSecAggPlusWorkflow) -> str:
    if strategy.halt_reason:
        return strategy.halt_reason
    failed = next((s for s in workflow.stages if not s["ok"]), None)
    if failed is not None:
        return (
            f"SecAgg+ halted at stage {failed['stage']!r}: {failed['active']} of {failed['sampled']} sampled "
            f"node(s) still active, the reconstruction threshold is {failed['threshold']}"
        )
    return "secure aggregation ended without an aggregate"


def run_prior_round(grid: Grid, context: Context, spec: PriorServerSpec) -> dict[str, Any]:
    """One federated-prior round (see the module docstring); returns the report it writes.

    Raises
    ------
    SecureAggregationHaltedError
        Too few consenting nodes or survivors, or a refused aggregate: no bundle was published.
    """
    t_start = time.perf_counter()
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    report_path = spec.out_dir / REPORT_FILE
    manifest = verify_bundle(spec.bundle_dir, load_public_key(spec.trusted_key))
    bundle = load_bundle(spec.bundle_dir, manifest)
    names = update_names(bundle, spec.pft)
    t0 = {k: v.detach().clone() for k, v in bundle.translator.state_dict().items()}
    strategy = PriorStrategy(spec, names, t0, bundle_digest(manifest))
    workflow = ReportingSecAggPlusWorkflow(
        num_shares=spec.num_shares,
        reconstruction_threshold=spec.reconstruction_threshold,
        max_weight=1.0,
        clipping_range=spec.clipping_range,
        quantization_range=spec.quantization_range,
        timeout=spec.timeout_s,
    )
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    release = update_release(spec.update)
    report: dict[str, Any] = {
        "nodes_asked": strategy.asked,
        "opted_in": strategy.opted_in,
        "participants": strategy.sampled,
        "survivors": strategy.survivors,
        "secagg_stages": workflow.stages,
        "secagg": {
            "num_shares": spec.num_shares,
            "reconstruction_threshold": spec.reconstruction_threshold,
            "clipping_range": spec.clipping_range,
            "quantization_range": spec.quantization_range,
            "max_error_per_coordinate": 2 * spec.clipping_range / spec.quantization_range,
        },
        "update_names": list(names),
        "release_per_device": release.summary(),
        "epsilon_per_device": release.epsilon,
        "privacy_unit": "person",
        "source_bundle_version": bundle.bundle_version,
        "seconds": 0.0,
    }
    if strategy.mean_update is None:
        reason = _halt_reason(strategy, workflow)
        report.update(status="halted", reason=reason, bundle_version=None, bundle_dir=None)
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        atomic_write_text(report_path, json.dumps(report, indent=2, default=str) + "\n")
        logger.error("federated prior halted: %s", reason)
        raise SecureAggregationHaltedError(f"federated prior halted, no bundle published: {reason}")
    new_state = apply_prior(t0, strategy.mean_update)
    version = bundle.bundle_version + 1
    destination = spec.out_dir / f"bundle-v{version}"
    meta = {
        "participants": strategy.survivors,
        "epsilon_per_device": release.epsilon,
        "from_version": bundle.bundle_version,
    }
    publish_prior(bundle, new_state, destination, spec.signing_key, meta)
    report.update(
        status="published",
        reason=None,
        bundle_version=version,
        bundle_dir=str(destination),
        mean_update={n: strategy.mean_update[n].tolist() for n in names},
        mean_update_norm=update_norm(strategy.mean_update),
    )
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    atomic_write_text(report_path, json.dumps(report, indent=2, default=str) + "\n")
    return report


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point: one federated-prior round from the spec."""
    spec = load_prior_spec(context)
    (spec.out_dir / REPORT_FILE).unlink(missing_ok=True)
    run_prior_round(grid, context, spec)
