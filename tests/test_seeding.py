"""One definition of a subject's seed (pft.core.seeding), which every engine's equality rests on."""

from __future__ import annotations

import re
from pathlib import Path

from pft.core.seeding import subject_seed

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("pft_core", "client", "server", "simulations", "pft_cli")


def test_subject_seed_hand_computed() -> None:
    assert subject_seed(0, 0) == 0
    assert subject_seed(0, 7) == 7
    assert subject_seed(3, 41) == 3041
    # distinct over runs and subjects while k < 1000
    seeds = {subject_seed(s, k) for s in range(3) for k in range(1000)}
    assert len(seeds) == 3000


def test_the_seed_rule_is_written_only_in_seeding() -> None:
    rule = re.compile(r"\*\s*1000\s*\+")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in PACKAGE_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "seeding.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if rule.search(line)
    ]
    assert offenders == []
