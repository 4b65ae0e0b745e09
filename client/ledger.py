"""The per-device privacy ledger: every DP release, composed with the accountant, authenticated.

Every release that can leave the device (an adaptation run whose metrics are reported, an update
sent to the opt-in federated prior) is appended BEFORE it runs (write-ahead): a run that would
take the cumulative epsilon of its privacy unit above the budget is refused with
:class:`~pft.core.errors.PrivacyBudgetExceededError` and nothing is run or appended; a run that
crashes after its entry was written still counts (conservative: epsilon never skips a release).

The cumulative epsilon of a unit is recomputed over the WHOLE history of that unit with one
Opacus accountant at the budget's delta (tighter than summing per-release epsilons). Units are
kept apart: a frame-level and a clip-level guarantee protect different records.

On a device the ledger is an :class:`~pft.client.store.EncryptedStore` of its own
(``privacy_ledger.store``, purpose ``pft-privacy-ledger``): encrypted and authenticated with the
person's store key, bound to the owner, with a monotonic generation counter, and mirrored
(``.copy`` written first, then the main file, each atomically). So:

- **append-only and locked**: :meth:`PrivacyLedger.record` re-reads the ledger, checks the
  release and appends it in one transaction under the store's lock; concurrent enrollments on one
  state are all recorded, and a copy that does not extend the one read is refused;
- **authenticated**: an edited, truncated, foreign or rolled-back ledger does not open; a missing
  ledger on a state that has personal data is noticed. Either way the ledger is marked broken
  (:attr:`PrivacyLedger.problem`) and every further release is refused with
  :class:`~pft.core.errors.LedgerIntegrityError` - it is never reset. Everything else the SDK does
  (predict, export, enroll without DP) keeps working;
- **torn writes**: a crash leaves each copy old or new (atomic rename) and the reader takes the
  newest copy that authenticates, so a crash or one damaged copy loses no release; the next
  record rewrites both copies. Only when neither copy authenticates are releases refused;
- **the budget is pinned** in the ledger when it is created: a later config can lower the
  epsilon it checks against, never raise it, and cannot change delta or the accountant.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from pft.client.store import EncryptedStore, StoreKey
from pft.core.config import FrozenConfig
from pft.core.errors import LedgerIntegrityError, PrivacyBudgetExceededError, StoreError
from pft.core.privacy import AccountantName, DPRelease, PrivacyUnit, epsilon_spent

__all__ = [
    "LEDGER_FILE",
    "LEDGER_FORMAT",
    "LEDGER_PURPOSE",
    "PrivacyBudget",
    "PrivacyLedger",
    "ReleaseKind",
    "longer_history",
]

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "pft-privacy-ledger/2"
LEDGER_FILE = "privacy_ledger.store"
LEDGER_PURPOSE = "pft-privacy-ledger"
ReleaseKind = Literal["adaptation", "prior_update"]

_RECOVERY = (
    "DP releases on this state are refused (its privacy ledger is never reset); predicting and "
    "enrolling without DP still work. See docs/privacy.md, 'the privacy ledger'."
)


class PrivacyBudget(FrozenConfig):
    """The device's total privacy budget per privacy unit: epsilon at delta, and the accountant
    that composes the history."""

    epsilon: float = Field(10.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: AccountantName = "rdp"


def _effective(pinned: PrivacyBudget, asked: PrivacyBudget) -> PrivacyBudget:
    """The budget releases are checked against: the pinned one, tightened (never loosened) by a
    config that asks for a smaller epsilon."""
    if asked != pinned:
        logger.warning(
            "the privacy budget is pinned at epsilon %g, delta %g, %s for this state; the config's "
            "epsilon %g, delta %g, %s can only lower epsilon",
            pinned.epsilon, pinned.delta, pinned.accountant, asked.epsilon, asked.delta, asked.accountant,
        )  # fmt: skip
    return pinned.model_copy(update={"epsilon": min(pinned.epsilon, asked.epsilon)})


def _check_entries(entries: object, where: str) -> list[dict[str, Any]]:
    """The entries as dicts with sequence numbers 0..n-1 and valid releases, or LedgerIntegrityError."""
    if not isinstance(entries, list):
        raise LedgerIntegrityError(f"{where}: the privacy ledger has no entry list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("seq") != i:
            raise LedgerIntegrityError(f"{where}: privacy ledger entry {i} is malformed or out of sequence")
        try:
            DPRelease.model_validate(entry.get("release"))
        except ValidationError as exc:
            raise LedgerIntegrityError(f"{where}: privacy ledger entry {i} holds no valid release") from exc
        out.append(dict(entry))
    return out


def longer_history(a: list[dict[str, Any]], b: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """The longer of two copies of one append-only ledger history; they must agree on their
    common part (else :class:`~pft.core.errors.LedgerIntegrityError`)."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for x, y in zip(short, long_, strict=False):
        if x.get("release") != y.get("release") or x.get("kind") != y.get("kind"):
            raise LedgerIntegrityError(
                f"{where}: two copies of the privacy ledger disagree at entry {x.get('seq')}; "
                "refusing to drop a release"
            )
    return [dict(e) for e in long_]


class PrivacyLedger:
    """An append-only list of DP releases with the cumulative epsilon after each.

    Build a device's ledger with :meth:`open`; ``PrivacyLedger(budget)`` is an in-memory ledger
    (simulations, tests).

    Parameters
    ----------
    budget:
        The budget every new release is checked against (for a stored ledger: the pinned budget,
        tightened by this one).
    entries:
        Entries already recorded (in memory only).
    """

    def __init__(self, budget: PrivacyBudget, entries: list[dict[str, Any]] | None = None) -> None:
        self.asked = budget
        self.budget = budget
        self.pinned: PrivacyBudget | None = None
        self.path: Path | None = None
        self.problem: str | None = None
        self._store: EncryptedStore | None = None
        self._owner = ""
        self._existed = False
        self._locked: str | None = None
        self._entries: list[dict[str, Any]] = _check_entries(list(entries or []), "<memory>")

    @classmethod
    def locked(cls, budget: PrivacyBudget, reason: str) -> PrivacyLedger:
        """A ledger that cannot be opened yet (e.g. no store key was given): every release is
        refused with :class:`~pft.core.errors.StoreError` saying ``reason``."""
        ledger = cls(budget)
        ledger._locked = reason
        return ledger

    @property
    def is_locked(self) -> bool:
        """Whether this ledger was made with :meth:`locked` (it holds nothing)."""
        return self._locked is not None

    # construction ----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        budget: PrivacyBudget,
        *,
        key: StoreKey,
        owner: str,
        expect_existing: bool = False,
    ) -> PrivacyLedger:
        """The device's ledger at ``path`` (created, with ``budget`` pinned, by its first write).

        Never raises for the ledger's content: a ledger that does not open (or is missing while
        ``expect_existing``) comes back with :attr:`problem` set, and refuses every release.

        Parameters
        ----------
        path:
            The ledger file, normally ``<state_dir>/privacy_ledger.store``.
        budget:
            The budget the app asks for (see :attr:`budget` for the one applied).
        key, owner:
            The person's store key and user id (the ledger is encrypted and bound to them).
        expect_existing:
            The state already holds personal data, so a ledger must be there: a missing one is a
            problem, not a fresh start.
        """
        ledger = cls(budget)
        ledger.path = Path(path)
        ledger._store = EncryptedStore(ledger.path, key, purpose=LEDGER_PURPOSE, backup="mirror")
        ledger._owner = owner
        if not ledger._store.exists():
            if expect_existing:
                ledger.problem = (
                    f"{ledger.path}: the privacy ledger is missing, but this state holds personal data"
                )
                logger.error("%s. %s", ledger.problem, _RECOVERY)
            return ledger
        ledger._existed = True
        try:
            read = ledger._store.read(owner=owner)
            ledger._adopt(read.payload)
        except StoreError as exc:  # LedgerIntegrityError is a StoreError too
            ledger.problem = str(exc)
            logger.error("%s: the privacy ledger cannot be trusted (%s). %s", ledger.path, exc, _RECOVERY)
        return ledger

    def _adopt(self, payload: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Take the stored ledger (it must extend what this object has seen); returns its entries."""
        where = str(self.path)
        if payload is None:
            if self._existed:
                raise LedgerIntegrityError(f"{where}: the privacy ledger disappeared")
            self.pinned = self.asked
            self.budget = self.asked
            return self._entries
        if payload.get("format") != LEDGER_FORMAT:
            raise LedgerIntegrityError(f"{where}: not a privacy ledger (format {payload.get('format')!r})")
        try:
            pinned = PrivacyBudget.model_validate(payload.get("budget"))
        except ValidationError as exc:
            raise LedgerIntegrityError(f"{where}: the pinned privacy budget is unreadable") from exc
        stored = _check_entries(payload.get("entries"), where)
        if len(stored) < len(self._entries):
            raise LedgerIntegrityError(f"{where}: the privacy ledger has fewer entries than were read before")
        self._entries = longer_history(self._entries, stored, where)
        self.pinned = pinned
        self.budget = _effective(pinned, self.asked)
        self._existed = True
        return self._entries

    def _payload(self) -> dict[str, Any]:
        assert self.pinned is not None
        return {
            "format": LEDGER_FORMAT,
            "budget": self.pinned.model_dump(mode="json"),
            "entries": [dict(e) for e in self._entries],
        }

    def _refuse_if_broken(self) -> None:
        if self._locked is not None:
            raise StoreError(self._locked)
        if self.problem is not None:
            raise LedgerIntegrityError(f"{self.problem}. {_RECOVERY}")

    # reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def as_list(self) -> list[dict[str, Any]]:
        """The entries as JSON-ready dicts (copies)."""
        return [json.loads(json.dumps(e)) for e in self._entries]

    def releases(self, unit: PrivacyUnit | None = None) -> list[DPRelease]:
        """The recorded releases (of one privacy unit when given)."""
        out = [DPRelease.model_validate(e["release"]) for e in self._entries]
        return [r for r in out if unit is None or r.privacy_unit == unit]

    def epsilon(self, unit: PrivacyUnit, extra: DPRelease | None = None) -> float:
        """Cumulative epsilon of ``unit`` at the budget's delta (with ``extra`` added if given)."""
        history = [r.mechanism for r in self.releases(unit)]
        if extra is not None and extra.privacy_unit == unit:
            history.append(extra.mechanism)
        return epsilon_spent(history, self.budget.delta, self.budget.accountant)

    def remaining(self, unit: PrivacyUnit) -> float:
        """Budget left for ``unit`` (0 when spent, or when the ledger cannot be trusted)."""
        if self.problem is not None:
            return 0.0
        return max(0.0, self.budget.epsilon - self.epsilon(unit))

    def refresh(self) -> None:
        """Re-read the stored ledger (other processes may have appended); no-op in memory."""
        if self._store is None or self.problem is not None:
            return
        if not self._store.exists():
            if self._existed:
                self.problem = f"{self.path}: the privacy ledger disappeared"
            return
        try:
            self._adopt(self._store.read(owner=self._owner).payload)
        except StoreError as exc:
            self.problem = str(exc)

    # writing -------------------------------------------------------------------------------
    def check(self, release: DPRelease) -> float:
        """The cumulative epsilon ``release`` would bring its unit to; raises if over budget.

        Raises
        ------
        PrivacyBudgetExceededError
            The release would exceed the budget (or its delta is above the budget's delta).
        LedgerIntegrityError
            The ledger cannot be trusted (see :attr:`problem`).
        """
        self._refuse_if_broken()
        if release.delta > self.budget.delta:
            raise PrivacyBudgetExceededError(
                f"release delta {release.delta:g} is above the budget's delta "
                f"{self.budget.delta:g}; nothing was run"
            )
        after = self.epsilon(release.privacy_unit, release)
        if not after <= self.budget.epsilon:
            before = self.epsilon(release.privacy_unit)
            raise PrivacyBudgetExceededError(
                f"this release would bring {release.privacy_unit}-level epsilon from {before:.3f} to "
                f"{after:.3f} (delta {self.budget.delta:g}), above the budget {self.budget.epsilon:g}; "
                "nothing was run"
            )
        return after

    def record(self, release: DPRelease, kind: ReleaseKind, note: str = "") -> dict[str, Any]:
        """Check ``release`` against the budget, append it and persist the ledger (write-ahead).

        On a device this is one transaction under the ledger's lock: the stored ledger is read
        again (another process may have appended), the release checked against it, appended and
        written to both copies before this returns.

        Returns the new entry.

        Raises
        ------
        PrivacyBudgetExceededError
            Over budget; nothing appended.
        LedgerIntegrityError
            The ledger cannot be trusted; nothing appended.
        """
        self._refuse_if_broken()
        if self._store is None:  # in memory
            if self.pinned is None:
                self.pinned = self.asked
            self._entries.append(self._entry(release, kind, note, self.check(release)))
            return json.loads(json.dumps(self._entries[-1]))

        def append(stored: dict[str, Any] | None) -> dict[str, Any]:
            self._adopt(stored)  # what other writers appended meanwhile
            entry = self._entry(release, kind, note, self.check(release))
            return {**self._payload(), "entries": [*self._payload()["entries"], entry]}

        try:
            written = self._store.update(append, owner=self._owner)
        except LedgerIntegrityError as exc:
            self.problem = str(exc)
            raise LedgerIntegrityError(f"{self.problem}. {_RECOVERY}") from exc
        except PrivacyBudgetExceededError:
            raise
        except StoreError as exc:  # the ledger no longer opens (damaged, rolled back, foreign)
            self.problem = f"{self.path}: the privacy ledger cannot be trusted ({exc})"
            raise LedgerIntegrityError(f"{self.problem}. {_RECOVERY}") from exc
        self._entries = [dict(e) for e in written["entries"]]
        return json.loads(json.dumps(self._entries[-1]))

    def _entry(self, release: DPRelease, kind: ReleaseKind, note: str, after: float) -> dict[str, Any]:
        return {
            "seq": len(self._entries),
            "kind": kind,
            "note": note,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "release": release.summary(),
            "cumulative_epsilon": after,
            "budget": self.budget.model_dump(mode="json"),
        }

    def ensure_stored(self) -> None:
        """Write the (empty) ledger with its pinned budget if it does not exist yet (a device's
        state is created): from then on, a missing ledger is noticed. No-op in memory."""
        if self._store is None or self._existed or self.problem is not None or self._locked:
            return
        self._store.update(lambda stored: (self._adopt(stored), self._payload())[1], owner=self._owner)

    def merge(self, entries: list[dict[str, Any]]) -> None:
        """Adopt another copy of this ledger (e.g. the one inside the personal store) if it is longer.

        The shorter copy must be a prefix of the longer one; if the copies disagree the ledger is
        marked broken (:attr:`problem`) rather than losing a release. Never raises.
        """
        if self.problem is not None:
            return
        try:
            other = _check_entries(list(entries), "personal state")
            longest = longer_history(self._entries, other, str(self.path or "<memory>"))
        except LedgerIntegrityError as exc:
            self.problem = str(exc)
            logger.error("%s. %s", exc, _RECOVERY)
            return
        if len(longest) <= len(self._entries):
            return
        if self._store is None:
            self._entries = longest
            return
        logger.warning("%s: restoring %d release(s) from the personal state's copy", self.path, len(longest))

        def adopt(stored: dict[str, Any] | None) -> dict[str, Any]:
            self._adopt(stored)
            self._entries = longer_history(self._entries, longest, str(self.path))
            return self._payload()

        try:
            self._store.update(adopt, owner=self._owner)
        except StoreError as exc:
            self.problem = str(exc)
            logger.error("%s. %s", exc, _RECOVERY)
