"""The Flower wire format both ends of the federation share: record names, keys, the spec variable.

The ServerApps (:mod:`pft.server.app`, :mod:`pft.server.prior_app`) write messages with these
names and the ClientApps (:mod:`pft.client.flower_app`, :mod:`pft.client.prior_app`) read them;
both find their settings through the same spec variable. Kept apart from the ClientApps so that
the server imports them without loading the device apps.
"""

from __future__ import annotations

__all__ = ["BUNDLE_RECORD", "CONFIG_RECORD", "OPT_IN_KEY", "SPEC_ENV"]

#: Environment variable naming the apps' JSON spec when the run_config does not (the simulation).
SPEC_ENV = "PFT_FLOWER_SPEC"
#: The ConfigRecord every server message carries (settings of the step).
CONFIG_RECORD = "config"
#: The ArrayRecord of ``train.install``: the signed bundle's files as uint8 arrays.
BUNDLE_RECORD = "bundle"
#: The federated prior's consent: a node's ``node_config`` key and its ``get_properties`` answer.
OPT_IN_KEY = "prior-opt-in"
