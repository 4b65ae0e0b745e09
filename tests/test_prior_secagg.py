"""The federated translator prior through Flower's real simulation engine and SecAgg+:
the aggregate equals the plaintext mean within the quantisation error (all survive, and with a
node dropping out), too few survivors halt cleanly with no bundle, only masked vectors leave an
opted-in node and only the consent answer leaves one that did not opt in, and the device's ledger
records each release or refuses it before anything is sent."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flower_support import AUDIT_KEY, TESTS, incoming
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pft.client.egress import EgressViolationError, check_prior_reply
from pft.client.ledger import LEDGER_FILE, PrivacyBudget, PrivacyLedger
from pft.client.prior_app import PriorConsentError, prior_egress_guard
from pft.client.store import StoreKey
from pft.core.bundle import load_bundle
from pft.core.errors import SecureAggregationHaltedError
from pft.core.prior import PriorUpdateConfig, update_release
from pft.core.signing import load_public_key, verify_bundle
from pft.simulations.experiment import ExperimentConfig, PreparedExperiment, prepare_experiment
from pft.simulations.prior_experiment import PriorFederation, run_prior_federation, write_prior_spec

TINY = ExperimentConfig.model_validate(
    {
        "profile": "biovid",
        "seed": 3,
        "source_subjects": 4,
        "target_subjects": 5,
        "methods": ["source_only", "pft"],
        "embedding_plot": False,
        "model": {"width": 8, "translator_hidden": 32},
        "source_train": {"epochs": 4},
        "pretrain": {"iterations": 40},
        "settings": {"pft": {"adapt": {"max_iterations": 30, "min_iterations": 30}}},
    }
)
UPDATE = PriorUpdateConfig(clip_norm=0.5, noise_multiplier=1.0)
CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**22
STEP = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE  # one quantisation level


def _read(folder: Path, name: str) -> list[dict[str, Any]]:
    path = folder / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _ledger(fed: PriorFederation, subject: str, budget: PrivacyBudget | None = None) -> PrivacyLedger:
    """A node's privacy ledger, opened with the node's store key (it is encrypted, bound to the person)."""
    key = StoreKey.from_file(json.loads(fed.spec.read_text())["node"]["store_key_file"])
    path = fed.nodes_dir / subject / LEDGER_FILE
    return PrivacyLedger.open(path, budget or PrivacyBudget(), key=key, owner=subject)


def _exhaust(fed: PriorFederation, subject: str, budget: PrivacyBudget) -> int:
    """Spend the node's budget so that one more UPDATE release does not fit; returns the entries."""
    ledger = _ledger(fed, subject, budget)
    spend = update_release(PriorUpdateConfig(noise_multiplier=2.0))
    while ledger.epsilon("person", update_release(UPDATE)) <= budget.epsilon:
        ledger.record(spend, "adaptation", note="earlier adaptations")
    return len(ledger)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedExperiment, Path]:
    root = tmp_path_factory.mktemp("prior")
    return prepare_experiment(TINY.resolved(), root / "cache"), root


def _federation(prepared: tuple[PreparedExperiment, Path], name: str, **kw: Any) -> PriorFederation:
    prep, root = prepared
    return write_prior_spec(
        prep,
        root / name,
        root / "cache",
        tuple(prep.targets),
        update=UPDATE,
        num_shares=1.0,
        reconstruction_threshold=0.6,
        clipping_range=CLIPPING_RANGE,
        **kw,
    )


def _run(fed: PriorFederation) -> dict[str, Any]:
    """The federation through `flwr run`, every node running flower_support.prior_recorded_app."""
    return run_prior_federation(
        fed,
        "flower_support:prior_recorded_app",
        run_config={AUDIT_KEY: str(fed.nodes_dir / "egress.jsonl")},
        python_path=[TESTS],
        run_timeout_s=900,
    )


def _plain_updates(fed: PriorFederation) -> dict[str, np.ndarray]:
    out = {}
    for subject in fed.subjects:
        rows = [e for e in _read(fed.nodes_dir / subject, "plain") if "arrays" in e]
        if rows:
            out[subject] = np.concatenate([np.asarray(a).ravel() for a in rows[0]["arrays"]])
    return out


def _check_aggregate(report: dict[str, Any], plain: dict[str, np.ndarray]) -> None:
    got = np.concatenate([np.asarray(v).ravel() for v in report["mean_update"].values()])
    want = np.mean([np.clip(u, -CLIPPING_RANGE, CLIPPING_RANGE) for u in plain.values()], axis=0)
    # each node's stochastic rounding is off by < 1 level: the mean by < 1 level (+ float32)
    assert np.max(np.abs(got - want)) < STEP + 1e-6
    # ... and it is not trivially zero: it is the mean of real, different updates
    assert np.linalg.norm(want) > 10 * STEP
    assert len({u.tobytes() for u in plain.values()}) == len(plain)


@pytest.mark.slow
def test_all_survive_sum_is_the_plaintext_mean_and_only_masked_vectors_leave(
    prepared: tuple[PreparedExperiment, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    prep, _ = prepared
    opted = tuple(prep.targets[:4])  # the 5th person did not consent
    fed = _federation(prepared, "all", opt_in=opted)
    capfd.readouterr()
    report = _run(fed)
    # through `flwr run` (no deprecated run_simulation); Flower's own log went to its file only
    printed = "".join(capfd.readouterr())
    assert "DEPRECATED" not in printed and " DEBUG " not in printed, printed[-2000:]
    assert "Starting Flower" in (fed.spec.parent / "flower.log").read_text()
    assert report["status"] == "published" and report["opted_in"] == 4 and report["survivors"] == 4
    plain = _plain_updates(fed)
    assert set(plain) == set(opted)
    _check_aggregate(report, plain)
    # a new signed bundle: version 2, T0 + the mean update, verified with the publisher's key
    manifest = verify_bundle(report["bundle_dir"], load_public_key(fed.public_key))
    assert manifest["bundle_version"] == 2
    old, new = load_bundle(fed.spec.parent / "bundle-v1"), load_bundle(report["bundle_dir"])
    delta = new.translator.out.bias - old.translator.out.bias
    assert torch.allclose(delta, torch.tensor(report["mean_update"]["out.bias"]), atol=1e-6)
    assert torch.equal(new.translator.out.weight, old.translator.out.weight)
    # egress: the opted-out node sent only its consent answer; opted-in nodes only SecAgg+ records
    out_node = fed.nodes_dir / prep.targets[4]
    sent_out = _read(out_node, "sent")
    assert [e["type"] for e in sent_out] == ["get_properties"]
    assert not (out_node / LEDGER_FILE).exists()
    audit = [json.loads(line) for line in (fed.nodes_dir / "egress.jsonl").read_text().splitlines()]
    for entry in audit:
        assert entry["error"] is None
        for rec in entry["records"].values():
            assert rec["kind"] != "ArrayRecord" or rec["keys"] == [], entry
    for subject in opted:
        sent = _read(fed.nodes_dir / subject, "sent")
        masked = [e for e in sent if "masked" in e]
        assert len(masked) == 1 and not any("arrays" in e for e in sent)
        vector = np.concatenate([np.asarray(a).ravel() for a in masked[0]["masked"]])[1:]  # [weight, update]
        quantised = np.round((np.clip(plain[subject], -1, 1) + 1) / STEP)
        assert vector.shape == quantised.shape and not np.allclose(vector, quantised, atol=2)
        assert not np.allclose(vector * STEP - 1, plain[subject], atol=1e-3)
        # the release is in the device's ledger, with its parameters and cumulative epsilon
        entries = _ledger(fed, subject).as_list()
        assert [e["kind"] for e in entries] == ["prior_update"]
        assert entries[0]["release"]["noise_multiplier"] == 1.0
        assert entries[0]["release"]["privacy_unit"] == "person"
        assert entries[0]["cumulative_epsilon"] == pytest.approx(report["epsilon_per_device"])


@pytest.mark.slow
def test_a_dropout_above_threshold_still_gives_the_survivors_mean(
    prepared: tuple[PreparedExperiment, Path],
) -> None:
    prep, _ = prepared
    budget = PrivacyBudget(epsilon=8.0)
    fed = _federation(prepared, "dropout", budget=budget)
    broke = prep.targets[2]
    spent = _exhaust(fed, broke, budget)  # its budget cannot afford the update
    report = _run(fed)
    assert report["participants"] == 5 and report["survivors"] == 4
    plain = _plain_updates(fed)
    assert broke not in plain and len(plain) == 4
    _check_aggregate(report, plain)
    # refused BEFORE anything was sent: no masked vector left, the ledger is unchanged
    assert not any("masked" in e for e in _read(fed.nodes_dir / broke, "sent"))
    assert len(_ledger(fed, broke, budget)) == spent


@pytest.mark.slow
def test_too_few_survivors_halt_cleanly_without_a_bundle(prepared: tuple[PreparedExperiment, Path]) -> None:
    prep, _ = prepared
    budget = PrivacyBudget(epsilon=8.0)
    fed = _federation(prepared, "halt", budget=budget)
    for subject in prep.targets[:3]:  # 3 of 5 drop; the threshold is round(0.6 * 5) = 3
        _exhaust(fed, subject, budget)
    with pytest.raises(SecureAggregationHaltedError, match="collect_masked_vectors"):
        _run(fed)
    report = json.loads((fed.out_dir / "prior_report.json").read_text())
    assert report["status"] == "halted" and report["bundle_version"] is None
    assert "threshold is 3" in report["reason"]
    assert not list(fed.out_dir.glob("bundle-v*"))


def test_guard_refuses_a_train_message_without_consent(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    (tmp_path / "k.pub").write_text("")
    node = {
        "dataset_root": str(tmp_path),
        "cache_root": str(tmp_path),
        "subjects": ["A", "B"],
        "trusted_key": str(tmp_path / "k.pub"),
        "store_key_file": str(tmp_path / "k"),
        "state_root": str(tmp_path / "nodes"),
    }
    spec.write_text(json.dumps({"node": node, "prior_node": {"opt_in": ["A"]}}))
    calls: list[str] = []

    def protocol(message: Message, context: Context) -> Message:
        calls.append(message.metadata.message_type)
        return Message(RecordDict(), reply_to=message)

    def context(index: int, opt_in: object = None) -> Context:
        node_config: dict[str, Any] = {"partition-id": index, "pft-spec": str(spec)}
        if opt_in is not None:
            node_config["prior-opt-in"] = opt_in
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    train = incoming(RecordDict(), "train")
    with pytest.raises(PriorConsentError):
        prior_egress_guard(train, context(1), protocol)  # B is not in the opt-in list
    with pytest.raises(PriorConsentError):
        prior_egress_guard(train, context(0, "false"), protocol)  # the node's own setting wins
    assert calls == []  # nothing of the SecAgg+ protocol ran


def test_prior_reply_allow_list() -> None:
    secagg = ConfigRecord({"masked_params": [b"\x00"]})
    ok = RecordDict(
        {
            "secaggplus_configs": secagg,
            "fitres.parameters": ArrayRecord(),
            "fitres.metrics": ConfigRecord({}),
            "fitres.num_examples": MetricRecord({"num_examples": 1}),
            "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
        }
    )
    check_prior_reply("train", ok, opted_in=True)
    with pytest.raises(EgressViolationError, match="did not opt in"):
        check_prior_reply("train", ok, opted_in=False)
    leaky = RecordDict({"secaggplus_configs": secagg, "fitres.parameters": ArrayRecord([np.zeros(3)])})
    with pytest.raises(EgressViolationError, match="plaintext"):
        check_prior_reply("train", leaky, opted_in=True)
    with pytest.raises(EgressViolationError):
        check_prior_reply("train", RecordDict({"secaggplus_configs": ConfigRecord({"params": [b"x"]})}), True)
    with pytest.raises(EgressViolationError, match="weight"):
        check_prior_reply(
            "train",
            RecordDict(
                {"secaggplus_configs": secagg, "fitres.num_examples": MetricRecord({"num_examples": 240})}
            ),
            True,
        )
    props = RecordDict(
        {
            "getpropertiesres.properties": ConfigRecord({"prior-opt-in": 0, "subject": "S005"}),
            "getpropertiesres.status": ConfigRecord({"code": 0, "message": "ok"}),
        }
    )
    with pytest.raises(EgressViolationError, match="subject"):
        check_prior_reply("get_properties", props, opted_in=False)
    with pytest.raises(EgressViolationError):
        check_prior_reply("evaluate", RecordDict(), opted_in=True)
    assert math.isfinite(STEP)
