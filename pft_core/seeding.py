"""How a run's seed becomes each subject's: the one rule every engine follows.

"The same numbers on every engine" (the loop, the batched engine and Flower give each target
subject the same adaptation) rests on every engine seeding subject k of a run alike; this is
where that seed is defined.
"""

from __future__ import annotations

SUBJECTS_PER_SEED = 1000
"""Subjects of one run with seeds distinct from every other run's (k < this)."""


def subject_seed(seed: int, k: int) -> int:
    """The seed of the k-th target subject (or Flower node) of a run seeded ``seed``.

    ``seed * 1000 + k``: for k < 1000 the subjects of one run, and of runs with other seeds, all
    get different seeds. Beyond 1000 subjects a run's seeds are still distinct from each other
    but overlap those of the run seeded ``seed + 1``.

    Parameters
    ----------
    seed:
        The run's seed.
    k:
        The subject's position among the run's targets in sorted order (a Flower node's index).
    """
    return seed * SUBJECTS_PER_SEED + k
