"""The Flower wire format both ends of the personalisation federation share.

The ServerApp (:mod:`pft.server.app`) writes messages with these record names and the ClientApp
(:mod:`pft.client.flower_app`) reads them; both find their settings through the same spec
variable. Kept apart from the ClientApp so that the server can import them without loading the
device app.
"""

from __future__ import annotations

__all__ = ["BUNDLE_RECORD", "CONFIG_RECORD", "SPEC_ENV"]

#: Environment variable naming the apps' JSON spec when the run_config does not (the simulation).
SPEC_ENV = "PFT_FLOWER_SPEC"
#: The ConfigRecord every server message carries (settings of the step).
CONFIG_RECORD = "config"
#: The ArrayRecord of ``train.install``: the signed bundle's files as uint8 arrays.
BUNDLE_RECORD = "bundle"
