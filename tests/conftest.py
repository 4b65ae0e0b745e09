"""Test-session setup shared by every test module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Flower's processes start each other by name (flower-superexec, flwr-clientapp, ...): make this
# environment's scripts come first on PATH, so the suite also works without an activated venv
# (CI runs `.venv/bin/python -m pytest`).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


# --- docs/reliability.md: which of the 15 cases held in this run -----------------------------------
# Tests that try a case carry ``@pytest.mark.reliability(N)`` (tests/test_reliability_cases.py has
# one per case; the deployment runs of cases 1, 6, 7, 8 live in the deployment test modules). A case
# holds when at least one of its tests ran and every one that ran passed.
RELIABILITY_CASES = 15
_case_outcomes: dict[int, list[tuple[str, str]]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    for marker in item.iter_markers("reliability"):  # travels with the report (xdist workers too)
        report.user_properties.append(("reliability", int(marker.args[0])))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the process that prints the summary (the xdist controller, or the only process)."""
    if report.when == "call" or report.outcome != "passed":
        for key, case in report.user_properties:
            if key == "reliability":
                _case_outcomes.setdefault(int(case), []).append((report.nodeid, report.outcome))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _case_outcomes:
        return
    held = [c for c, runs in _case_outcomes.items() if runs and all(o == "passed" for _, o in runs)]
    failed = sorted(c for c, runs in _case_outcomes.items() if any(o == "failed" for _, o in runs))
    untried = sorted(set(range(1, RELIABILITY_CASES + 1)) - {c for c in held} - set(failed))
    line = f"docs/reliability.md: {len(held)}/{RELIABILITY_CASES} cases hold"
    if failed:
        line += f"; failing: {failed}"
    if untried:
        line += f"; not tried in this run: {untried}"
    terminalreporter.write_sep("=", line)
