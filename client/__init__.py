"""The device side: the SDK an app embeds (:mod:`pft.client.sdk`), its encrypted store, privacy
ledger and personal state, and the Flower ClientApps that adapt Flower messages to the SDK.

The SDK's main names are importable from here (``from pft.client import Personalizer``); they are
loaded on first use, so ``import pft.client.wire`` (the ServerApp) does not load the SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pft.client.sdk import ClientConfig, EnrollmentReport, Personalizer, Prediction
    from pft.client.store import StoreKey

__all__ = ["ClientConfig", "EnrollmentReport", "Personalizer", "Prediction", "StoreKey"]


def __getattr__(name: str) -> Any:
    if name == "StoreKey":
        from pft.client import store

        return store.StoreKey
    if name in __all__:
        from pft.client import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'pft.client' has no attribute {name!r}")
