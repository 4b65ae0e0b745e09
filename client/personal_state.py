"""A person's personal state on the device: what enrollment made, in one format for every path.

The SDK (:class:`pft.client.sdk.Personalizer`) writes and reads it, and the Flower ClientApp does
so through the SDK, so a translator adapted by a federation round and one adapted by an app are
the same file, checked the same way. Layout of a device's ``state_dir``::

    bundles/              the TrustedBundleCache: one <digest>/ folder per installed bundle (the
                          newest signed version is current; no pointer file to edit)
    personal.store        this state, encrypted (pft.client.store; + .prev, .lock, .counter)
    privacy_ledger.store  the privacy ledger, encrypted and bound to the person (pft.client.ledger;
                          mirrored in .copy; a copy of its entries is also in the state)

Fields of the payload: ``format`` (:data:`STATE_FORMAT`), ``bundle_digest`` and
``bundle_version`` of the bundle it was made with, the adapted ``translator``'s weights, the two
style codes, the ``reference_subject``, the ``privacy_ledger`` entries and an ``enrollment``
summary. The store's associated data binds the purpose :data:`STATE_PURPOSE`, so another file of
the device (encrypted under the same key for another purpose) never opens as a personal state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from pft.client.store import EncryptedStore, StoreKey
from pft.core.errors import PersonalStateMismatchError, StoreError

__all__ = [
    "BUNDLES_DIR",
    "STATE_FILE",
    "STATE_FORMAT",
    "STATE_PURPOSE",
    "PersonalState",
    "personal_store",
]

STATE_FORMAT = "pft-personal-state/1"
STATE_FILE = "personal.store"
STATE_PURPOSE = "pft-personal-state"
BUNDLES_DIR = "bundles"


def personal_store(state_dir: str | Path, key: StoreKey) -> EncryptedStore:
    """The encrypted store of the personal state in ``state_dir`` (``personal.store``)."""
    return EncryptedStore(Path(state_dir) / STATE_FILE, key, purpose=STATE_PURPOSE)


@dataclass(frozen=True)
class PersonalState:
    """One person's adapted translator and what it was made with.

    Attributes
    ----------
    bundle_digest, bundle_version:
        The bundle the translator was adapted from (a state is only used with that bundle).
    translator:
        The adapted translator's state dict.
    style_target, style_reference:
        The person's style code and the reference style code T translates towards.
    reference_subject:
        The closest matched source subject.
    privacy_ledger:
        The ledger's entries when the state was saved (:mod:`pft.client.ledger`).
    enrollment:
        A JSON-ready summary of the enrollment (frames, iterations, pairing, privacy...).
    """

    bundle_digest: str
    bundle_version: int
    translator: dict[str, Tensor]
    style_target: Tensor
    style_reference: Tensor
    reference_subject: str
    privacy_ledger: list[dict[str, Any]] = field(default_factory=list)
    enrollment: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The payload the encrypted store holds (tensors detached and copied)."""
        return {
            "format": STATE_FORMAT,
            "bundle_digest": self.bundle_digest,
            "bundle_version": self.bundle_version,
            "translator": {k: v.detach().clone() for k, v in self.translator.items()},
            "style_target": self.style_target.detach().clone(),
            "style_reference": self.style_reference.detach().clone(),
            "reference_subject": self.reference_subject,
            "privacy_ledger": [dict(e) for e in self.privacy_ledger],
            "enrollment": dict(self.enrollment),
        }

    @classmethod
    def from_payload(
        cls, payload: dict[str, Any], where: str, *, bundle_digest: str, bundle_version: int
    ) -> PersonalState:
        """Check a decrypted payload and read it, for use with the bundle ``bundle_digest``.

        Raises
        ------
        StoreError
            Not a personal state of this format, or a field is missing or of the wrong type.
        PersonalStateMismatchError
            The state was made with another bundle (the person must enroll again).
        """
        if payload.get("format") != STATE_FORMAT:
            raise StoreError(f"{where}: not an SDK personal state (format {payload.get('format')!r})")
        if payload.get("bundle_digest") != bundle_digest:
            raise PersonalStateMismatchError(
                f"{where}: this personal state was made with bundle {str(payload.get('bundle_digest'))[:16]} "
                f"(version {payload.get('bundle_version')}), but the installed bundle is "
                f"{bundle_digest[:16]} (version {bundle_version}); enroll again"
            )
        try:
            translator = dict(payload["translator"])
            style_target = payload["style_target"].float()
            style_reference = payload["style_reference"].float()
            state = cls(
                bundle_digest=bundle_digest,
                bundle_version=int(payload.get("bundle_version", bundle_version)),
                translator=translator,
                style_target=style_target,
                style_reference=style_reference,
                reference_subject=str(payload["reference_subject"]),
                privacy_ledger=[dict(e) for e in payload.get("privacy_ledger") or []],
                enrollment=dict(payload.get("enrollment") or {}),
            )
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise StoreError(f"{where}: the personal state is incomplete ({why}); enroll again") from exc
        if not all(isinstance(v, Tensor) for v in translator.values()):
            raise StoreError(f"{where}: the saved translator holds values that are not tensors")
        return state
