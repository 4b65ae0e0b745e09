"""The per-device privacy ledger: every DP release, composed with the accountant, on disk.

Every release that can leave the device (an adaptation run whose metrics are reported, an update
sent to the opt-in federated prior) is appended BEFORE it runs (write-ahead): a run that would
take the cumulative epsilon of its privacy unit above the budget is refused with
:class:`~pft.core.errors.PrivacyBudgetExceededError` and nothing is run or appended; a run that
crashes after its entry was written still counts (conservative: epsilon never skips a release).

The cumulative epsilon of a unit is recomputed over the WHOLE history of that unit with one
Opacus accountant at the budget's delta (tighter than summing per-release epsilons). Units are
kept apart: a frame-level and a clip-level guarantee protect different records.

File: JSON, written atomically (temp file, fsync, rename) by :mod:`pft.core.atomic`; the SDK also
keeps a copy inside its encrypted personal store and :meth:`PrivacyLedger.merge` keeps the
longer history, so deleting one copy never resets the budget while the other exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pft.core.atomic import atomic_write_text
from pft.core.config import FrozenConfig
from pft.core.errors import PrivacyBudgetExceededError, StoreError
from pft.core.privacy import AccountantName, DPRelease, PrivacyUnit, epsilon_spent

__all__ = ["LEDGER_FILE", "LEDGER_FORMAT", "PrivacyBudget", "PrivacyLedger", "ReleaseKind"]

LEDGER_FORMAT = "pft-privacy-ledger/1"
LEDGER_FILE = "privacy_ledger.json"
ReleaseKind = Literal["adaptation", "prior_update"]


class PrivacyBudget(FrozenConfig):
    """The device's total privacy budget per privacy unit: epsilon at delta, and the accountant
    that composes the history."""

    epsilon: float = Field(10.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: AccountantName = "rdp"


class PrivacyLedger:
    """An append-only list of DP releases with the cumulative epsilon after each.

    Parameters
    ----------
    budget:
        The budget every new release is checked against.
    path:
        Where the ledger is persisted (``None``: in memory only).
    entries:
        Entries already recorded (as written by :meth:`as_list`).
    """

    def __init__(
        self,
        budget: PrivacyBudget,
        path: str | Path | None = None,
        entries: list[dict[str, Any]] | None = None,
    ) -> None:
        self.budget = budget
        self.path = Path(path) if path is not None else None
        self._entries: list[dict[str, Any]] = [dict(e) for e in entries or []]
        self._check_sequence(self._entries, str(self.path or "<memory>"))

    @classmethod
    def open(cls, path: str | Path, budget: PrivacyBudget) -> PrivacyLedger:
        """The ledger at ``path`` (empty if the file does not exist yet).

        Raises
        ------
        StoreError
            The file exists but is not a ledger (it is never silently reset).
        """
        path = Path(path)
        if not path.exists():
            return cls(budget, path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: the privacy ledger cannot be read ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise StoreError(f"{path}: not a privacy ledger")
        return cls(budget, path, list(data.get("entries") or []))

    @staticmethod
    def _check_sequence(entries: list[dict[str, Any]], where: str) -> None:
        for i, e in enumerate(entries):
            if e.get("seq") != i:
                raise StoreError(f"{where}: privacy ledger entry {i} has sequence number {e.get('seq')}")
            DPRelease.model_validate(e["release"])

    # --- reading -------------------------------------------------------------------------------
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
        """Budget left for ``unit`` (0 when spent)."""
        return max(0.0, self.budget.epsilon - self.epsilon(unit))

    # --- writing -------------------------------------------------------------------------------
    def check(self, release: DPRelease) -> float:
        """The cumulative epsilon ``release`` would bring its unit to; raises if over budget.

        Raises
        ------
        PrivacyBudgetExceededError
            The release would exceed the budget (or its delta is above the budget's delta).
        """
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

        Returns the new entry. Raises :class:`PrivacyBudgetExceededError` (nothing appended).
        """
        after = self.check(release)
        entry = {
            "seq": len(self._entries),
            "kind": kind,
            "note": note,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "release": release.summary(),
            "cumulative_epsilon": after,
            "budget": self.budget.model_dump(mode="json"),
        }
        self._entries.append(entry)
        try:
            self.save()
        except BaseException:
            self._entries.pop()
            raise
        return json.loads(json.dumps(entry))

    def save(self) -> Path | None:
        """Write the ledger atomically (no-op in memory)."""
        if self.path is None:
            return None
        body = {"format": LEDGER_FORMAT, "entries": self._entries}
        return atomic_write_text(self.path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    def merge(self, entries: list[dict[str, Any]]) -> None:
        """Adopt another copy of this ledger (e.g. from the encrypted store) if it is longer.

        The shorter copy must be a prefix of the longer one; otherwise the ledgers disagree and
        a :class:`StoreError` is raised rather than losing a release.
        """
        other = [dict(e) for e in entries]
        self._check_sequence(other, "merged ledger")
        short, long_ = (other, self._entries) if len(other) <= len(self._entries) else (self._entries, other)
        for a, b in zip(short, long_, strict=False):
            if a["release"] != b["release"]:
                raise StoreError(f"privacy ledgers disagree at entry {a['seq']}; refusing to drop a release")
        if len(other) > len(self._entries):
            self._entries = other
            self.save()
