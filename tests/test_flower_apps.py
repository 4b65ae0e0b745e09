"""The Flower apps' pieces without a federation: the egress allow-list, bundle publishing and the
ClientApp's install/query handlers (signed bundles only; tampered and rolled-back ones refused)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flower_support import incoming
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pft.client.egress import EgressViolationError, check_reply, describe_outgoing, metrics_reply
from pft.client.flower_app import install, make_client_app, query
from pft.client.store import generate_key_file
from pft.core.bundle import save_bundle
from pft.core.errors import (
    BundleError,
    BundleRollbackError,
    BundleSignatureError,
    BundleTamperedError,
    BundleUnsignedFileError,
    UnsafeWeightsError,
)
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, StyleNormalizer, Translator
from pft.core.safe_weights import load_safetensors, save_safetensors
from pft.core.signing import (
    bundle_digest,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    sign_bundle,
    verify_bundle,
    write_manifest_files,
    write_signing_key_pair,
)
from pft.server.publish import bundle_arrays, publish_bundle
from pft.server.rounds import NodeIdentities, ReplyIdentityError

CFG = ModelConfig(width=8, image_size=32, num_classes=2, translator_hidden=16)


def _metrics(values: dict[str, object]) -> RecordDict:
    return RecordDict({"metrics": MetricRecord(values)})  # type: ignore[arg-type]


# --- egress allow-list ---------------------------------------------------------------------------
EVALUATE = {
    "f1": 55.5,
    "accuracy": 60.0,
    "eval-frames": 96,
    "adapt-iterations": 30,
    "adapt-seconds": 0.5,
    "subject-index": 1,
}


def test_valid_metrics_pass() -> None:
    got = check_reply("evaluate", _metrics(EVALUATE))
    assert got == {k: float(v) for k, v in EVALUATE.items()}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"f1": math.nan}, "not finite"),
        ({"f1": math.inf}, "not finite"),
        ({"accuracy": -1.0}, "outside"),
        ({"f1": 100.5}, "outside"),
        ({"adapt-seconds": -0.1}, "outside"),
        ({"eval-frames": 0}, "positive count"),
        ({"loss": 0.3}, "not allow-listed"),
        ({"translator.weight": [0.1, 0.2]}, "not allow-listed"),
        # issue 19: a reply is a schema, not just finite numbers
        ({"adapt-iterations": 1e300}, "outside"),
        ({"adapt-seconds": 1e12}, "outside"),
        ({"subject-index": 1e9}, "outside"),
        ({"subject-index": 1.5}, "must be an integer"),
        ({"eval-frames": 2.5}, "positive count"),
    ],
)
def test_bad_metrics_are_rejected(values: dict[str, object], match: str) -> None:
    with pytest.raises(EgressViolationError, match=match):
        check_reply("evaluate", _metrics({**EVALUATE, **values}))


@pytest.mark.parametrize("kind", ["query", "train.install", "train", "evaluate"])
def test_a_reply_missing_a_key_or_empty_is_rejected(kind: str) -> None:
    """Issue 19: one empty metrics reply crashed the ServerApp with a KeyError."""
    with pytest.raises(EgressViolationError, match="missing"):
        check_reply(kind, _metrics({}))
    with pytest.raises(EgressViolationError, match="missing"):
        check_reply(kind, _metrics({"subject-index": 0}))


def test_replies_with_arrays_or_config_records_are_rejected() -> None:
    weights = ArrayRecord({"T": Array(np.zeros(4, dtype=np.float32))})
    with pytest.raises(EgressViolationError, match="records"):
        check_reply("train", RecordDict({"metrics": MetricRecord({"adapt-iterations": 3}), "T": weights}))
    with pytest.raises(EgressViolationError, match="not a MetricRecord"):
        check_reply("train", RecordDict({"metrics": ConfigRecord({"subject": "S001"})}))
    with pytest.raises(EgressViolationError, match="no egress allow-list"):
        check_reply("train.upload", _metrics({"adapt-iterations": 3}))


def test_a_node_cannot_build_a_reply_outside_the_allow_list() -> None:
    message = incoming(RecordDict(), "train")
    with pytest.raises(EgressViolationError):
        metrics_reply(message, {"neutral-frames": 40, "loss": float("nan")})
    train = {
        "neutral-frames": 40,
        "adapt-iterations": 30,
        "adapt-seconds": 0.25,
        "subject-index": 0,
        "pairing-fallback": 0,
    }
    reply = metrics_reply(message, train)
    described = describe_outgoing(reply)
    assert described["records"] == {
        "metrics": {
            "kind": "MetricRecord",
            "keys": sorted(train),
            "values": {k: float(v) for k, v in train.items()},
        }
    }


# --- publishing and the install/query handlers -----------------------------------------------------
@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    source = save_bundle(
        tmp_path / "trained",
        extractor=FeatureExtractor(CFG).eval(),
        classifier=Classifier(CFG).eval(),
        translator=Translator(CFG).eval(),
        normalizer=StyleNormalizer.fit(torch.randn(4, CFG.style_dim)),
        model_config=CFG,
        class_names=["neutral", "pain"],
        source_styles={"code/s0": torch.randn(CFG.style_dim)},
        descriptors={"s0": np.arange(3, dtype=np.float64)},
        extra={"pairing": "cosine"},
    )
    key_path, pub_path = write_signing_key_pair(tmp_path / "keys")
    spec = {
        "node": {
            "dataset_root": str(tmp_path / "data"),
            "cache_root": str(tmp_path / "cache"),
            "subjects": ["S001"],
            "trusted_key": str(pub_path),
            "store_key_file": str(generate_key_file(tmp_path / "keys" / "store.key")),
            "state_root": str(tmp_path / "nodes"),
        }
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return {
        "root": tmp_path,
        "source": source,
        "key": key_path,
        "pub": pub_path,
        "spec": tmp_path / "spec.json",
    }


def _context(world: dict[str, Path]) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        node_config={"pft-spec": str(world["spec"]), "partition-id": 0},
        state=RecordDict(),
        run_config={},
    )


def _release(world: dict[str, Path], version: int) -> Path:
    folder = world["root"] / f"v{version}"
    publish_bundle(world["source"], folder, version, load_signing_key(world["key"]))
    return folder


def _install_message(folder: Path, pub: Path) -> Message:
    arrays, _ = bundle_arrays(folder, load_public_key(pub))
    return incoming(RecordDict({"bundle": arrays}), "train.install")


def _ask(world: dict[str, Path], digest: str) -> dict[str, float]:
    message = incoming(RecordDict({"config": ConfigRecord({"bundle-digest": digest})}), "query")
    return check_reply("query", query(message, _context(world)).content)


def test_publish_signs_a_new_version(world: dict[str, Path]) -> None:
    folder = _release(world, 4)
    manifest = verify_bundle(folder, load_public_key(world["pub"]))
    assert manifest["bundle_version"] == 4
    with pytest.raises(BundleSignatureError):
        verify_bundle(folder, generate_signing_key().public_key())


def test_node_installs_signed_bundle_and_refuses_tampered_extra_and_rollback(world: dict[str, Path]) -> None:
    v2, v1 = _release(world, 2), _release(world, 1)
    pub = load_public_key(world["pub"])
    digest2 = bundle_digest(verify_bundle(v2, pub))
    assert _ask(world, digest2) == {"bundle-current": 0.0, "bundle-version": 0.0, "subject-index": 0.0}

    reply = install(_install_message(v2, world["pub"]), _context(world))
    assert check_reply("train.install", reply.content)["bundle-version"] == 2.0
    assert _ask(world, digest2)["bundle-current"] == 1.0

    # rollback to an older signed version: refused, v2 kept
    with pytest.raises(BundleRollbackError):
        install(_install_message(v1, world["pub"]), _context(world))
    # one flipped byte in the weights, in transit
    message = _install_message(_release(world, 3), world["pub"])
    arrays = message.content["bundle"]
    data = arrays["C.safetensors"].numpy().copy()
    data[-1] ^= 0xFF
    arrays["C.safetensors"] = Array(data)
    with pytest.raises(BundleTamperedError):
        install(message, _context(world))
    # an unsigned extra file
    message = _install_message(world["root"] / "v3", world["pub"])
    message.content["bundle"]["payload.py"] = Array(np.frombuffer(b"import os", dtype=np.uint8).copy())
    with pytest.raises(BundleUnsignedFileError):
        install(message, _context(world))
    # a file name escaping the folder
    message = _install_message(world["root"] / "v3", world["pub"])
    message.content["bundle"]["../evil.json"] = Array(np.frombuffer(b"{}", dtype=np.uint8).copy())
    with pytest.raises(BundleTamperedError, match="outside"):
        install(message, _context(world))
    assert _ask(world, digest2) == {"bundle-current": 1.0, "bundle-version": 2.0, "subject-index": 0.0}


# --- a validly signed bundle the node cannot load never becomes current (issue 19) ----------------
def _signed_variant(world: dict[str, Path], name: str, version: int, change: Callable[[Path], None]) -> Path:
    """Release ``version``, change its files, and have the publisher sign the result."""
    folder = world["root"] / name
    publish_bundle(world["source"], folder, version, load_signing_key(world["key"]))
    change(folder)
    (folder / "manifest.sig").unlink()
    manifest = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items() if k != "files"}
    write_manifest_files(folder, manifest)
    sign_bundle(folder, load_signing_key(world["key"]))
    return folder


def _rewrite_weights(file: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_safetensors(folder / file)
        change(tensors)
        save_safetensors(tensors, folder / file)

    return apply


def _first_weight(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_weight(tensors)
    tensors[key] = tensors[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))


def _half(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_weight(tensors)
    tensors[key] = tensors[key].half()


def _int64(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_weight(tensors)
    tensors[key] = tensors[key].long()


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_weight(tensors)
    tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)


def _pickle(folder: Path) -> None:
    torch.save({"weight": torch.zeros(2)}, folder / "T.safetensors")


def _config_change(change: Callable[[dict[str, object]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return apply


UNLOADABLE: dict[str, tuple[Callable[[Path], None], type[Exception]]] = {
    "pickled weights": (_pickle, UnsafeWeightsError),
    "NaN weights": (_rewrite_weights("C.safetensors", _nan), BundleError),
    "float16 weights": (_rewrite_weights("T.safetensors", _half), BundleError),
    "int64 weights": (_rewrite_weights("C.safetensors", _int64), BundleError),
    "wrong shapes": (_rewrite_weights("C.safetensors", _wrong_shape), BundleError),
    "NaN style statistics": (_rewrite_weights("styles.safetensors", _nan), BundleError),
    "class names missing": (_config_change(lambda c: c.pop("class_names")), BundleError),
    "config not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), BundleError),
    "torn config": (lambda f: (f / "config.json").write_text('{"model_config": {'), BundleError),
}


@pytest.mark.parametrize("case", list(UNLOADABLE))
def test_node_refuses_a_signed_bundle_it_cannot_load_and_keeps_the_good_one(
    world: dict[str, Path], case: str
) -> None:
    change, error = UNLOADABLE[case]
    good = _release(world, 2)
    install(_install_message(good, world["pub"]), _context(world))
    digest2 = bundle_digest(verify_bundle(good, load_public_key(world["pub"])))
    bad = _signed_variant(world, "bad", 3, change)
    verify_bundle(bad, load_public_key(world["pub"]))  # the publisher's signature is valid
    with pytest.raises(error):
        install(_install_message(bad, world["pub"]), _context(world))
    assert _ask(world, digest2) == {"bundle-current": 1.0, "bundle-version": 2.0, "subject-index": 0.0}
    # the good release is still accepted (it is not refused as a rollback of the bad one)
    reply = install(_install_message(good, world["pub"]), _context(world))
    assert check_reply("train.install", reply.content)["bundle-version"] == 2.0


# --- error replies: a code and a fixed message, checked and audited (issue 19) --------------------
def test_a_failing_handler_sends_a_fixed_error_and_audits_it(world: dict[str, Path]) -> None:
    state = world["root"] / "site-state"
    context = _context(world)
    context.node_config["state-dir"] = str(state)
    app = make_client_app()
    train_message = incoming(
        RecordDict({"config": ConfigRecord({"pft-config": "{}", "seed": 0, "round": 1})}), "train"
    )
    reply = app(train_message, context)  # no bundle installed: the handler raises BundleError
    assert reply.has_error() and reply.error.code == 1200
    reason = reply.error.reason or ""
    assert reason == "no usable bundle on the node (refused, missing or not loadable)"
    assert "S001" not in reason and str(world["root"]) not in reason  # no person id, no local path
    audit = [json.loads(line) for line in (state / "egress.jsonl").read_text().splitlines()]
    assert [(e["type"], e["code"], e["error"]) for e in audit] == [("train", 1200, reason)]


def test_a_reply_outside_the_allow_list_never_leaves(world: dict[str, Path]) -> None:
    def leak(message: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(message, context)
        reply.content["metrics"]["subject-id"] = 1.0  # e.g. a handler that adds a key
        return reply

    log = world["root"] / "egress.jsonl"
    app = make_client_app(mods=[leak])
    context = _context(world)
    context.node_config["egress-log"] = str(log)
    query_message = incoming(RecordDict({"config": ConfigRecord({"bundle-digest": "0" * 64})}), "query")
    reply = app(query_message, context)
    assert reply.has_error() and reply.error.code == 1101
    assert json.loads(log.read_text())["records"] == {}
    # and a well-formed reply passes the same guard unchanged
    ok = make_client_app()(query_message, context)
    assert check_reply("query", ok.content)["bundle-current"] == 0.0


def test_a_node_cannot_claim_another_nodes_subject() -> None:
    """Issue 19: a node claiming another's subject index used to overwrite its results."""
    ids = NodeIdentities(subjects=3)
    ids.check(101, {"subject-index": 0.0})
    ids.check(202, {"subject-index": 1.0})
    ids.check(101, {"subject-index": 0.0})  # the same claim again is fine
    with pytest.raises(ReplyIdentityError, match="already held by node 101"):
        ids.check(303, {"subject-index": 0.0})
    with pytest.raises(ReplyIdentityError, match="now claims subject-index 1, earlier 0"):
        ids.check(101, {"subject-index": 1.0})
    with pytest.raises(ReplyIdentityError, match="outside"):
        ids.check(303, {"subject-index": 3.0})
