"""The Flower simulation engine gives the in-process engine's per-subject numbers, and nothing but
allow-listed metrics leaves a virtual node (every reply of a full run is recorded); with DP on,
every node writes its release to its privacy ledger and the results carry the privacy summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from flower_support import AUDIT_KEY, TESTS

from pft.client.egress import ALLOWED_METRICS
from pft.client.ledger import LEDGER_FILE, PrivacyBudget, PrivacyLedger
from pft.client.personal_state import STATE_FILE
from pft.client.store import StoreKey
from pft.simulations.experiment import ExperimentConfig, ExperimentResult, run_experiment
from pft.simulations.flower_engine import client_resources, run_flower_simulation, simulation_key_dir

TINY = ExperimentConfig.model_validate(
    {
        "profile": "biovid",
        "seed": 3,
        "source_subjects": 4,
        "target_subjects": 2,
        "methods": ["source_only", "pft", "oracle"],
        "embedding_plot": False,
        "model": {"width": 8, "translator_hidden": 32},
        "source_train": {"epochs": 4},
        "pretrain": {"iterations": 40},
        "settings": {
            "pft": {"adapt": {"max_iterations": 30, "min_iterations": 30}},
            "oracle": {"adapt": {"max_iterations": 5, "min_iterations": 5}},
        },
    }
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flower-engine")


@pytest.fixture(scope="module")
def both_engines(root: Path) -> tuple[ExperimentResult, ExperimentResult, Path]:
    loop = run_experiment(TINY, root / "loop", root / "cache")
    audit = root / "egress.jsonl"
    flower = run_flower_simulation(
        TINY,
        root / "flower",
        root / "cache",
        client_app="flower_support:audited_app",
        run_config={AUDIT_KEY: str(audit)},
        python_path=[TESTS],
        run_timeout_s=900,
    )
    return loop, flower, audit


@pytest.mark.slow
def test_flower_engine_equals_in_process_engine(both_engines: tuple[Any, Any, Path]) -> None:
    loop, flower, _ = both_engines
    assert flower.results["engine"] == "flower"
    assert set(flower.results["methods"]) == set(TINY.methods)
    for method in TINY.methods:
        want = loop.results["methods"][method]["per_subject"]
        got = flower.results["methods"][method]["per_subject"]
        assert got == want, method
        assert flower.results["methods"][method]["mean_f1"] == loop.results["methods"][method]["mean_f1"]
    # not a degenerate oracle: the methods do not all give the same numbers
    distinct = {json.dumps(loop.results["methods"][m]["per_subject"], sort_keys=True) for m in TINY.methods}
    assert len(distinct) > 1
    assert (flower.out_dir / "results.json").is_file() and (flower.out_dir / "report.md").is_file()
    assert flower.results["federation"]["completed"] == 2


@pytest.mark.slow
def test_no_private_key_lands_in_the_results_folder(root: Path, both_engines: tuple[Any, Any, Path]) -> None:
    """The simulation's signing and store keys live in the cache root (0700), not under --out."""
    _, flower, _ = both_engines
    assert sorted(flower.out_dir.rglob("*.key")) == []
    assert not (flower.out_dir / "flower" / "keys").exists()
    keys = simulation_key_dir(root / "cache")
    assert sorted(p.name for p in keys.glob("*.key")) == ["bundle-signing.key", "store.key"]
    assert keys.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o077 == 0 for p in keys.glob("*.key"))
    assert (flower.out_dir / "flower" / "flower.log").is_file()  # Flower's own log, not the terminal


@pytest.mark.slow
@pytest.mark.reliability(14)
def test_only_allow_listed_metrics_leave_a_node(both_engines: tuple[Any, Any, Path]) -> None:
    _, flower, audit = both_engines
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    # every message each of the 2 nodes answered: query, install, train, 3 evaluations
    types = sorted(e["type"] for e in entries)
    assert types == sorted(["query", "train.install", "train"] * 2 + ["evaluate"] * 6)
    for entry in entries:
        assert entry["error"] is None
        assert list(entry["records"]) == ["metrics"], entry
        record = entry["records"]["metrics"]
        assert record["kind"] == "MetricRecord", entry
        assert set(record["keys"]) <= ALLOWED_METRICS[entry["type"]], entry
        assert all(isinstance(v, int | float) for v in record["values"].values())
    # the nodes' personal translators stayed on their disks, encrypted
    stores = sorted((flower.out_dir / "flower" / "nodes").glob(f"*/{STATE_FILE}"))
    assert len(stores) == 2
    assert all(s.read_bytes()[:8] == b"PFTSTORE" for s in stores)


@pytest.mark.slow
def test_flower_dp_run_writes_node_ledgers_and_a_privacy_summary(root: Path) -> None:
    """``pft simulate --engine flower --dp-epsilon 3`` (the API it calls) on the tiny cohort."""
    dp = TINY.model_validate(
        {
            **TINY.model_dump(mode="json"),
            "methods": ["pft"],
            "settings": {
                **TINY.settings.model_dump(mode="json"),
                "pft": {**TINY.settings.pft.model_dump(mode="json"), "dp": {"epsilon": 3.0}},
            },
        }
    )
    loop = run_experiment(dp, root / "dp-loop", root / "cache")
    flower = run_flower_simulation(dp, root / "dp-flower", root / "cache", run_timeout_s=900)
    privacy = flower.results["methods"]["pft"]["privacy"]
    # the same summary as the in-process engine's (each node computed its own release)
    assert privacy == loop.results["methods"]["pft"]["privacy"]
    assert privacy["privacy_unit"] == "frame" and 0 < privacy["epsilon"] <= 3.0
    assert flower.results["methods"]["pft"]["per_subject"] == loop.results["methods"]["pft"]["per_subject"]
    subjects = sorted(privacy["per_subject"])
    assert len(subjects) == 2
    ledgers = flower.results["federation"]["privacy_ledger"]
    assert sorted(ledgers) == subjects
    for subject in subjects:
        ledger = flower.out_dir / "flower" / "nodes" / subject / LEDGER_FILE
        key = StoreKey.from_file(simulation_key_dir(root / "cache") / "store.key")
        opened = PrivacyLedger.open(ledger, PrivacyBudget(), key=key, owner=subject)
        assert opened.problem is None
        entries = opened.as_list()
        assert [e["kind"] for e in entries] == ["adaptation"]
        assert entries[0]["release"]["epsilon"] == privacy["per_subject"][subject]
        assert entries[0]["cumulative_epsilon"] == ledgers[subject]
    assert flower.results["federation"]["pairing_fallback"] == []
    assert "DP-SGD" in (flower.out_dir / "report.md").read_text()


def test_client_resources_are_checked() -> None:
    assert client_resources(1, 0.25) == {"num_cpus": 1, "num_gpus": 0.25}
    for bad in (0, 0.5, (os.cpu_count() or 1) + 1, True):
        with pytest.raises(ValueError, match="num_cpus"):
            client_resources(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_gpus"):
        client_resources(1, 1.5)


# --- issue 19: hostile replies never crash the ServerApp; a node cannot speak for another --------
@pytest.fixture(scope="module")
def hostile_run(
    both_engines: tuple[ExperimentResult, ExperimentResult, Path], tmp_path_factory: pytest.TempPathFactory
) -> ExperimentResult:
    loop, _, _ = both_engines
    root = loop.out_dir.parent  # the same cache: only the federation runs again
    # node 1 runs flower_support.hostile_app (its mod outside the egress guard)
    return run_flower_simulation(
        TINY,
        root / "hostile",
        root / "cache",
        client_app="flower_support:hostile_app",
        python_path=[TESTS],
        min_nodes=1,
        run_timeout_s=900,
    )


@pytest.mark.slow
@pytest.mark.reliability(7)
@pytest.mark.reliability(9)
def test_hostile_replies_are_failures_with_reasons_and_the_run_completes(
    both_engines: tuple[ExperimentResult, ExperimentResult, Path], hostile_run: ExperimentResult
) -> None:
    loop = both_engines[0]
    results = hostile_run.results
    honest = sorted(loop.results["methods"]["pft"]["per_subject"])[0]  # node 0's person
    for method in TINY.methods:
        got = results["methods"][method]["per_subject"]
        assert got == {honest: loop.results["methods"][method]["per_subject"][honest]}, method
    evaluations = [e for e in results["federation"]["exchanges"] if e["type"] == "evaluate"]
    reasons = [next(iter(e["failed"].values())) for e in evaluations]
    assert all(e["ok"] == 1 and len(e["failed"]) == 1 for e in evaluations)
    assert "claims subject-index 0" in reasons[0]  # it said it was subject 1 before
    assert "missing" in reasons[1]
    assert "outside" in reasons[2]
    report = (hostile_run.out_dir / "report.md").read_text()
    assert "claims subject-index 0" in report and "missing" in report  # the reasons reach the report
