"""The seed protocol: which cohort seeds are for choosing defaults and which are for reporting.

A cohort seed renders a whole new cohort (new people, new splits), so seeds are the benchmark's
independent replications. They are split in two roles, in the open:

- **validation** seeds (``>= VALIDATION_SEED_MIN``; the protocol's are ``VALIDATION_SEEDS`` =
  100, 101, 102) are the ONLY place where the default settings of any method (PFT's stage 3
  included) may be chosen;
- **test** seeds (below ``VALIDATION_SEED_MIN``; the protocol's are ``TEST_SEEDS`` = 0, 1, 2)
  are the ones the results tables report, and nobody tunes on them.

Reports never average a validation seed with a test seed (``pft benchmark`` groups runs by
(profile, role)).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

SeedRole = Literal["validation", "test"]

VALIDATION_SEED_MIN = 100
"""Seeds at or above this are validation seeds; seeds below it are test seeds."""

VALIDATION_SEEDS: tuple[int, ...] = (100, 101, 102)
"""The validation seeds of the protocol: defaults are chosen on these only."""

TEST_SEEDS: tuple[int, ...] = (0, 1, 2)
"""The test seeds of the protocol: the results tables report these."""


def seed_role(seed: int) -> SeedRole:
    """The role of a cohort seed in the protocol.

    Parameters
    ----------
    seed:
        A cohort seed (``ExperimentConfig.seed``), ``>= 0``.

    Returns
    -------
    SeedRole
        ``"validation"`` for ``seed >= VALIDATION_SEED_MIN``, else ``"test"``.
    """
    if seed < 0:
        raise ValueError(f"a cohort seed is >= 0, got {seed}")
    return "validation" if seed >= VALIDATION_SEED_MIN else "test"


def split_by_role(seeds: Iterable[int]) -> dict[SeedRole, tuple[int, ...]]:
    """``seeds`` grouped by role (test first), each group sorted; roles without seeds are left out."""
    groups: dict[SeedRole, list[int]] = {"test": [], "validation": []}
    for seed in seeds:
        groups[seed_role(seed)].append(seed)
    return {role: tuple(sorted(set(found))) for role, found in groups.items() if found}
