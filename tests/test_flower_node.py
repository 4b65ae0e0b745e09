"""One device path: the Flower ClientApp's handlers are the SDK's calls.

Oracle: a node that installs a signed bundle and answers ``train`` (DP on) ends with the same
translator (tensor-equal), the same style codes, reference and privacy-ledger entry as an app that
runs the SDK's public video path (``Personalizer.enroll``) on the same neutral videos with the
same settings and seed; the node's personal state is the SDK's (format, purpose, bundle digest),
its ``evaluate`` scores with ``C(T(f))`` of that state, and the pairing fallback is reported.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flower_support import incoming
from flwr.app import ConfigRecord, Context, Message, RecordDict
from sdk_support import SdkWorld, shared_world

from pft.client.egress import ALLOWED_METRICS, check_reply
from pft.client.flower_app import evaluate, install, train, train_metrics
from pft.client.ledger import LEDGER_FILE, PrivacyBudget, PrivacyLedger
from pft.client.personal_state import STATE_FILE, STATE_FORMAT, personal_store
from pft.client.sdk import ClientConfig, Personalizer
from pft.client.store import StoreKey, generate_key_file
from pft.core.adaptation import AdaptConfig
from pft.core.data import FaceCropConfig, VideoConfig
from pft.core.errors import PersonalStateMismatchError, PrivacyBudgetExceededError
from pft.core.metrics import macro_f1
from pft.core.personalize import PersonalizeConfig
from pft.core.privacy import DPConfig
from pft.core.seeding import subject_seed
from pft.core.signing import load_public_key
from pft.server.publish import bundle_arrays

SEED, INDEX = 7, 0
VIDEO = VideoConfig(max_frames=64)
CROP = FaceCropConfig(size=32)
PFT = PersonalizeConfig(
    adapt=AdaptConfig(lr=0.01, max_iterations=12, min_iterations=12),
    dp=DPConfig(epsilon=4.0, privacy_unit="video", frames_per_record=4),
)
BUDGET = PrivacyBudget(epsilon=20.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A node (partition 0 = the cohort's target subject) that installed v1 and answered ``train``."""
    world = shared_world(tmp_path_factory)
    root = tmp_path_factory.mktemp("flower-node")
    subject = world.index.filter(role="target").records[0].subject
    spec = {
        "node": {
            "dataset_root": str(world.cohort),
            "cache_root": str(root / "cache"),
            "video": VIDEO.model_dump(mode="json"),
            "crop": CROP.model_dump(mode="json"),
            "subjects": [subject],
            "trusted_key": str(world.public_pem),
            "store_key_file": str(generate_key_file(root / "store.key")),
            "state_root": str(root / "nodes"),
            "privacy_budget": BUDGET.model_dump(mode="json"),
        }
    }
    (root / "spec.json").write_text(json.dumps(spec))
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"pft-spec": str(root / "spec.json"), "partition-id": INDEX},
        state=RecordDict(),
        run_config={},
    )
    arrays, _ = bundle_arrays(world.bundle_v1, load_public_key(world.public_pem))
    install(incoming(RecordDict({"bundle": arrays}), "train.install"), context)
    message = incoming(
        RecordDict({"config": ConfigRecord({"pft-config": PFT.model_dump_json(), "seed": SEED, "round": 1})}),
        "train",
    )
    reply = check_reply("train", train(message, context).content)
    return {
        "world": world,
        "root": root,
        "subject": subject,
        "context": context,
        "reply": reply,
        "state": root / "nodes" / subject,
    }


def _node_ledger(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of the node's privacy ledger (encrypted with its store key, bound to its person)."""
    key = StoreKey.from_file(node["root"] / "store.key")
    return PrivacyLedger.open(node["state"] / LEDGER_FILE, BUDGET, key=key, owner=node["subject"]).as_list()


def _sdk_enrollment(world: SdkWorld, state: Path) -> Personalizer:
    """What an app does: the SDK's video path on the same neutral videos, settings and seed (its
    DP ledger is encrypted with the app's own key, for the same person id)."""
    config = ClientConfig(
        video=VIDEO,
        crop=CROP,
        detector="annotated",
        personalize=PFT.model_copy(update={"seed": subject_seed(SEED, INDEX)}),
        privacy_budget=BUDGET,
    )
    p = Personalizer.from_bundle(
        world.bundle_v1,
        world.public_pem,
        state_dir=state,
        config=config,
        key=StoreKey.from_passphrase("the app's own passphrase"),
        owner="app-user",
    )
    p.enroll(world.target_videos("adapt"))
    return p


@pytest.mark.slow
def test_clientapp_train_equals_the_sdk(node: dict[str, Any], tmp_path: Path) -> None:
    world = node["world"]
    key = StoreKey.from_file(node["root"] / "store.key")
    on_node = Personalizer.load(node["state"], world.public_pem, key, owner=node["subject"])
    with _sdk_enrollment(world, tmp_path / "app") as app, on_node:
        assert on_node.personalization is not None and app.personalization is not None
        got, want = on_node.personalization, app.personalization
        node_t, app_t = got.translator.state_dict(), want.translator.state_dict()
        assert node_t.keys() == app_t.keys()
        assert all(torch.equal(node_t[k], app_t[k]) for k in app_t)
        assert torch.equal(got.style_target, want.style_target)
        assert torch.equal(got.style_reference, want.style_reference)
        assert got.reference_subject == want.reference_subject
        # not a degenerate oracle: T moved away from the bundle's T0
        t0 = app.bundle.translator.state_dict()
        assert any(not torch.equal(app_t[k], t0[k]) for k in t0)
        # the same privacy-ledger entry, on the node's disk and in its personal state
        node_ledger = _node_ledger(node)
        app_ledger = app.privacy_ledger
        assert len(node_ledger) == len(app_ledger) == 1
        drop_time = [{k: v for k, v in e.items() if k != "at"} for e in (node_ledger[0], app_ledger[0])]
        assert drop_time[0] == drop_time[1]
        assert node_ledger[0]["kind"] == "adaptation" and node_ledger[0]["release"]["privacy_unit"] == "video"
        assert [e["seq"] for e in on_node.privacy_ledger] == [0]
        # the reply carries the release's accounting, the same numbers as the SDK's report
        release = node_ledger[0]["release"]
        reply = node["reply"]
        assert reply["dp-epsilon"] == release["epsilon"]
        assert reply["dp-noise-multiplier"] == release["noise_multiplier"]
        assert reply["dp-sample-rate"] == release["sample_rate"]
        assert reply["dp-steps"] == release["steps"] == 12
        assert reply["dp-cumulative-epsilon"] == node_ledger[0]["cumulative_epsilon"]
        assert reply["neutral-frames"] == 16 and reply["pairing-fallback"] == 0.0
        assert set(reply) <= ALLOWED_METRICS["train"]


def _context(node: dict[str, Any], state_dir: Path) -> Context:
    config = {"pft-spec": str(node["root"] / "spec.json"), "partition-id": INDEX, "state-dir": str(state_dir)}
    return Context(run_id=1, node_id=11, node_config=config, state=RecordDict(), run_config={})


def _evaluate_message(method: str) -> Message:
    record = ConfigRecord({"method": method, "seed": SEED, "method-settings": "{}"})
    return incoming(RecordDict({"config": record}), "evaluate")


@pytest.mark.slow
def test_node_state_is_the_sdk_personal_state(node: dict[str, Any], tmp_path: Path) -> None:
    world = node["world"]
    key = StoreKey.from_file(node["root"] / "store.key")
    assert (node["state"] / STATE_FILE).read_bytes()[:8] == b"PFTSTORE"
    payload = personal_store(node["state"], key).load(owner=node["subject"])
    assert payload["format"] == STATE_FORMAT
    with Personalizer.from_installed(
        node["state"], world.public_pem, config=ClientConfig(prestart_decoder=False)
    ) as installed:
        assert payload["bundle_digest"] == installed.bundle_digest
    # the bundle-digest check applies on the node: after v2 is installed, the state made with
    # v1 is refused by ``evaluate`` (enroll again), on a copy of the node's folder
    copy = Path(shutil.copytree(node["state"], tmp_path / "node-copy"))
    context = _context(node, copy)
    arrays, _ = bundle_arrays(world.bundle_v2, load_public_key(world.public_pem))
    install(incoming(RecordDict({"bundle": arrays}), "train.install"), context)
    refused = r"version 1.*installed bundle.*version 2.*enroll again"
    with pytest.raises(PersonalStateMismatchError, match=refused):
        evaluate(_evaluate_message("pft"), context)


@pytest.mark.slow
def test_node_evaluates_pft_with_its_saved_state(node: dict[str, Any]) -> None:
    world = node["world"]
    reply = check_reply("evaluate", evaluate(_evaluate_message("pft"), node["context"]).content)
    # by hand: C(T(F(x))) of the SDK, loaded from the node's state, on the eval videos' crops
    key = StoreKey.from_file(node["root"] / "store.key")
    config = ClientConfig(video=VIDEO, crop=CROP, detector="annotated", prestart_decoder=False)
    with Personalizer.load(node["state"], world.public_pem, key, owner=node["subject"], config=config) as p:
        y, pred = [], []
        for label in world.index.classes:
            for video in world.target_videos("eval", label):
                prediction = p.predict(video)
                y += [world.index.classes.index(label)] * len(prediction.probabilities)
                pred += list(prediction.probabilities.argmax(axis=1))
    assert reply["eval-frames"] == len(y)
    assert reply["f1"] == pytest.approx(macro_f1(np.array(y), np.array(pred), len(world.index.classes)))
    assert reply["adapt-iterations"] == 12


@pytest.mark.slow
def test_node_refuses_a_dp_run_over_its_budget(node: dict[str, Any]) -> None:
    """The node's own budget (20) holds whatever the server asks: a second run at the whole budget
    (epsilon 20, on top of the 4 spent) is refused before it runs; the ledger keeps its one entry."""
    assert PFT.dp is not None
    greedy = PFT.model_copy(update={"dp": PFT.dp.model_copy(update={"epsilon": BUDGET.epsilon})})
    record = ConfigRecord({"pft-config": greedy.model_dump_json(), "seed": SEED, "round": 3})
    message = incoming(RecordDict({"config": record}), "train")
    before = (node["state"] / STATE_FILE).read_bytes()
    with pytest.raises(PrivacyBudgetExceededError, match="nothing was run"):
        train(message, node["context"])
    assert len(_node_ledger(node)) == 1
    assert (node["state"] / STATE_FILE).read_bytes() == before


def test_pairing_fallback_is_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A landmark-pairing bundle and no landmarks: random pairing, said in the report and reply."""
    world = shared_world(tmp_path_factory)
    config = ClientConfig(
        prestart_decoder=False,
        personalize=PersonalizeConfig(adapt=AdaptConfig(max_iterations=2, min_iterations=2)),
    )
    with Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=config) as p:
        features, stats = torch.randn(12, p.bundle.model_config.pooled_dim), torch.rand(12, 8)
        _, stats = p.bundle.extractor.features_and_statistics(torch.zeros(1, 3, 32, 32))
        stats = stats.expand(12, -1)
        matched = p.enroll_features(features, stats)
        assert matched.pairing == "cosine" and not matched.pairing_fallback
        p.source_model = dataclasses.replace(p.source_model, pairing="landmark")
        report = p.enroll_features(features, stats, descriptor=None)
        assert report.pairing == "random" and report.pairing_fallback
        assert p.enrollment["pairing_fallback"] == report.pairing_fallback
        assert train_metrics(report, None)["pairing-fallback"] == 1.0
        assert train_metrics(matched, None)["pairing-fallback"] == 0.0
        with pytest.raises(ValueError, match=r"features must be \(N, "):
            p.enroll_features(features[:, :5], stats)
        with pytest.raises(ValueError, match="frame_stats"):
            p.enroll_features(features, stats[:3])
