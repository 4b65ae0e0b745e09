"""The opt-in federated translator prior, device side: a legacy Flower ClientApp under SecAgg+.

A node that consented (``node_config["prior-opt-in"]``, else the spec's ``prior_node.opt_in``
list; default: NO) answers a ``fit`` by

1. checking that the server's T0 is the translator of the bundle it holds (verified signature),
2. checking the release (clip ``C``, noise ``sigma``, ``delta``: one person-level Gaussian
   mechanism, :func:`pft.core.prior.update_release`) against its privacy ledger - a release over
   budget is refused BEFORE anything is computed or sent,
3. personalising T on its NEUTRAL frames through the SDK (:func:`pft.client.flower_app.enroll_node`,
   as the Message-API app does), taking the update of the trainable tensors, clipping and noising
   it with a device-secret generator (:func:`pft.core.prior.privatize_update`),
4. appending the release to the ledger (write-ahead), then returning the noised update with
   weight 1; Flower's ``secaggplus_mod`` quantises and MASKS it, so the server only ever
   reconstructs the sum over the survivors.

:func:`prior_egress_guard` sits outside ``secaggplus_mod``: a ``train`` message to a node that did
not opt in is refused before the SecAgg+ protocol starts, and every reply is checked against
:func:`pft.client.egress.check_prior_reply` (no plaintext array, no metric, only the masked vector).
"""

from __future__ import annotations

import json
import secrets

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, Scalar

from pft.client.egress import EgressViolationError, check_prior_reply, make_egress_guard_mod
from pft.client.flower_app import Node, enroll_node, node_from_context, spec_path
from pft.client.ledger import PrivacyBudget
from pft.client.wire import OPT_IN_KEY
from pft.core.config import FrozenConfig
from pft.core.errors import PFTError
from pft.core.personalize import PersonalizeConfig
from pft.core.prior import PriorUpdateConfig, privatize_update, translator_update, update_release
from pft.core.seeding import subject_seed

__all__ = [
    "OPT_IN_KEY",
    "PriorClient",
    "PriorConsentError",
    "PriorNodeSettings",
    "make_prior_client_app",
    "node_opted_in",
    "prior_egress_guard",
]

PRIOR_NODE_SECTION = "prior_node"


class PriorConsentError(PFTError):
    """The server asked a node for a prior update the person did not consent to; nothing was sent."""


class PriorNodeSettings(FrozenConfig):
    """The device-side settings of the prior (the ``prior_node`` section of the node spec).

    ``opt_in`` lists the subjects (nodes) that consented when ``node_config`` does not say;
    ``budget`` is the device's total privacy budget (per privacy unit, in its ledger);
    ``noise_seed`` makes the noise reproducible in simulations only - by default each release
    draws its noise from a device-secret random seed the server never learns.
    """

    opt_in: tuple[str, ...] = ()
    budget: PrivacyBudget = PrivacyBudget()
    noise_seed: int | None = None


def prior_settings(context: Context) -> PriorNodeSettings:
    """The ``prior_node`` section of the node spec (defaults when absent: nobody opted in)."""
    document = json.loads(spec_path(context).read_text())
    return PriorNodeSettings.model_validate(document.get(PRIOR_NODE_SECTION, {}))


def node_opted_in(context: Context, node: Node, settings: PriorNodeSettings) -> bool:
    """The person's consent: ``node_config["prior-opt-in"]`` if set, else the spec's list."""
    value = context.node_config.get(OPT_IN_KEY)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        return value.strip().lower() in ("1", "true", "yes")
    if isinstance(value, int):
        return value == 1
    return node.subject in settings.opt_in


class PriorClient(NumPyClient):
    """One node's side of the federated prior (legacy NumPyClient; SecAgg+ masks its reply)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.node = node_from_context(context)
        self.settings = prior_settings(context)
        self.opted_in = node_opted_in(context, self.node, self.settings)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The consent answer: ``prior-opt-in`` 0/1 and the installed bundle's version."""
        installed = self.node.bundle_cache().installed()
        return {
            OPT_IN_KEY: 1 if self.opted_in else 0,
            "bundle-version": installed.bundle_version if installed else 0,
        }

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Never: a device does not send its translator in plaintext."""
        raise EgressViolationError("the prior client never sends parameters in plaintext")

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Personalise, privatise and return the update of T's trainable tensors (weight 1).

        Raises
        ------
        PriorConsentError
            The node did not opt in.
        PrivacyBudgetExceededError
            The release would exceed the device's budget (checked before any work).
        """
        node = self.node
        if not self.opted_in:
            raise PriorConsentError(f"node {node.index} did not opt in to the federated prior")
        pft = PersonalizeConfig.model_validate_json(str(config["pft-config"]))
        seed = subject_seed(int(config["seed"]), node.index)
        with node.personalizer(pft.model_copy(update={"seed": seed}), self.settings.budget) as personalizer:
            if personalizer.bundle_digest != str(config.get("bundle-digest", "")):
                raise PFTError(f"node {node.index}: the server's T0 is not the bundle this node holds")
            names = tuple(json.loads(str(config["update-names"])))
            t0 = personalizer.bundle.translator.state_dict()
            if len(parameters) != len(names) or any(
                not np.array_equal(np.asarray(p), t0[n].numpy())
                for p, n in zip(parameters, names, strict=True)
            ):
                raise PFTError(
                    f"node {node.index}: the server's T0 tensors differ from the installed bundle's"
                )
            update_config = PriorUpdateConfig.model_validate_json(str(config["prior-update"]))
            # the device's one ledger (the SDK's): refuse before any work, so nothing leaves
            personalizer.ledger.check(update_release(update_config))
            enroll_node(node, personalizer)
            assert personalizer.personalization is not None
            adapted = personalizer.personalization.translator
            update = translator_update(personalizer.bundle.translator, adapted, names)
            noise_seed = (
                subject_seed(self.settings.noise_seed, node.index)
                if self.settings.noise_seed is not None
                else secrets.randbits(63)
            )
            generator = torch.Generator().manual_seed(noise_seed)
            noised, release = privatize_update(update, update_config, generator)
            personalizer.ledger.record(
                release, "prior_update", note=f"federated prior on bundle {personalizer.bundle_digest[:16]}"
            )
        return [noised[n].numpy() for n in names], 1, {}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Not part of the prior: nothing is evaluated or sent."""
        raise EgressViolationError("the prior client answers no evaluate messages")


def prior_egress_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse a prior ``train`` message without consent BEFORE SecAgg+ runs; check every reply.

    Raises
    ------
    PriorConsentError
        A ``train`` message to a node that did not opt in.
    EgressViolationError
        A reply outside :func:`pft.client.egress.check_prior_reply` (it is not sent).
    """
    node = node_from_context(context)
    opted_in = node_opted_in(context, node, prior_settings(context))
    kind = message.metadata.message_type
    if kind == "train" and not opted_in:
        raise PriorConsentError(f"node {node.index} did not opt in to the federated prior; nothing was sent")
    reply = call_next(message, context)
    if not reply.has_error():
        check_prior_reply(kind, reply.content, opted_in)
    return reply


def _client_fn(context: Context) -> Client:
    return PriorClient(context).to_client()


def make_prior_client_app(mods: list[Mod] | None = None, inner_mods: list[Mod] | None = None) -> ClientApp:
    """The prior's ClientApp: ``[egress guard, *mods, prior_egress_guard, secaggplus_mod,
    *inner_mods]`` around :class:`PriorClient` (the guard turns exceptions into fixed error
    replies; ``mods`` see exactly what leaves, e.g. the egress audit log;
    ``inner_mods`` see the plaintext reply before SecAgg+ masks it - for tests)."""
    return ClientApp(
        client_fn=_client_fn,
        mods=[
            make_egress_guard_mod(check_content=False),  # fixed error replies, audited
            *(mods or []),
            prior_egress_guard,
            secaggplus_mod,
            *(inner_mods or []),
        ],
    )


app = make_prior_client_app()

