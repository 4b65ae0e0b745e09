"""The Flower ClientApp: a thin adapter between Flower messages and the on-device SDK.

One node is one person (a device, or a virtual node of the simulation). Every handler turns the
message into :class:`~pft.client.sdk.Personalizer` calls on the node's ``state_dir`` and the
result into a reply, so a node verifies bundles, adapts, keeps its privacy ledger, falls back
from landmark to random pairing and stores the personal state exactly as an app embedding the
SDK does. Message types:

- ``query``: which bundle do you hold? (reply: ``bundle-current`` 0/1 for the digest asked about)
- ``train.install``: here is a signed bundle (its files as a uint8 ArrayRecord);
  :meth:`Personalizer.from_bundle` verifies it, loads it and installs it (refusing tampered,
  unsigned-extra-file, pickled and rolled-back bundles and keeping the one it had).
- ``train``: adapt the translator T on the node's NEUTRAL ``adapt`` videos
  (:meth:`Personalizer.enroll_features` on the node's cached features; with DP on, the release is
  checked against and written to the node's privacy ledger first) and save the personal state,
  encrypted, on the node's disk (:meth:`Personalizer.save`).
- ``evaluate``: where the node has labelled ``eval`` videos (the simulation), score a method:
  ``pft`` with the saved personal state (:meth:`Personalizer.load`, which checks it was made
  with the installed bundle), the other methods of :mod:`pft.core.methods` on the node's frames.

Every reply goes through :func:`pft.client.egress.metrics_reply`: only allow-listed numeric metrics
leave the node. The node's settings come from a JSON spec (:class:`NodeSpec`) named by
``node_config["pft-spec"]``, else ``run_config["pft-spec"]``, else ``$PFT_FLOWER_SPEC`` (the
simulation's in-process engine passes an empty run_config).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from pft.client.egress import make_egress_guard_mod, metrics_reply
from pft.client.ledger import PrivacyBudget
from pft.client.personal_state import BUNDLES_DIR
from pft.client.sdk import ClientConfig, EnrollmentReport, Personalizer
from pft.client.store import StoreKey
from pft.client.wire import BUNDLE_RECORD, CONFIG_RECORD, SPEC_ENV
from pft.core.bundle import verified_bundle_cache
from pft.core.config import FrozenConfig
from pft.core.data import FaceCropConfig, VideoConfig, VideoRecord, load_dataset
from pft.core.data.cache import state_dict_sha256
from pft.core.errors import BundleTamperedError, PFTError
from pft.core.frames import FrameSet, FrameStore
from pft.core.methods import (
    METHODS,
    MethodSettings,
    TargetData,
    TargetImages,
    method_input,
    method_names,
    needs_images,
    target_images,
)
from pft.core.metrics import accuracy, macro_f1
from pft.core.personalize import PersonalizeConfig
from pft.core.seeding import subject_seed
from pft.core.signing import TrustedBundleCache, load_public_key

__all__ = ["Node", "NodeSpec", "app", "enroll_node", "make_client_app", "node_from_context", "spec_path"]


class NodeSpec(FrozenConfig):
    """Where a node finds its data, keys and disk, and its privacy budget.

    ``subjects[k]`` is the person of the node with ``partition-id`` k (the simulation: the k-th
    target subject in sorted order, which also gives the adaptation seed ``subject_seed(seed, k)``).
    ``privacy_budget`` is the device's own total budget per privacy unit (its ledger refuses a DP
    run that would exceed it, whatever the server asks).
    """

    dataset_root: Path
    layout: str = "synthetic"
    cache_root: Path
    video: VideoConfig = VideoConfig()
    crop: FaceCropConfig = FaceCropConfig()
    subjects: tuple[str, ...]
    trusted_key: Path
    store_key_file: Path
    state_root: Path
    torch_threads: int | None = None
    privacy_budget: PrivacyBudget = PrivacyBudget()


@dataclass(frozen=True)
class Node:
    """This node: its spec, its index and person, and its own folder (the SDK's ``state_dir``)."""

    spec: NodeSpec
    index: int
    subject: str
    state_dir: Path

    def bundle_cache(self) -> TrustedBundleCache:
        """The node's trusted bundle cache: verifies against the spec's public key and fully loads a
        bundle before it becomes current (the SDK's check)."""
        return verified_bundle_cache(self.state_dir / BUNDLES_DIR, load_public_key(self.spec.trusted_key))

    def client_config(
        self, personalize: PersonalizeConfig | None = None, budget: PrivacyBudget | None = None
    ) -> ClientConfig:
        """The SDK settings of this node (no decoder process: a node reads its frame store)."""
        return ClientConfig(
            video=self.spec.video,
            crop=self.spec.crop,
            personalize=personalize or PersonalizeConfig(),
            privacy_budget=budget or self.spec.privacy_budget,
            prestart_decoder=False,
        )

    def personalizer(
        self, personalize: PersonalizeConfig | None = None, budget: PrivacyBudget | None = None
    ) -> Personalizer:
        """The SDK over the bundle this node has installed (verified again), not enrolled; the
        node's store key and person open its encrypted privacy ledger."""
        return Personalizer.from_installed(
            self.state_dir,
            self.spec.trusted_key,
            config=self.client_config(personalize, budget),
            key=self.store_key(),
            owner=self.subject,
        )

    def store_key(self) -> StoreKey:
        """The key of the node's encrypted personal state."""
        return StoreKey.from_file(self.spec.store_key_file)

    def _frame_store(self) -> tuple[FrameStore, list[VideoRecord]]:
        """The node's frame store with its person's videos loaded (crops cached as in ``pft simulate``)."""
        index = load_dataset(self.spec.dataset_root, self.spec.layout)
        records = index.by_subject().get(self.subject, [])
        store = FrameStore(index, self.spec.cache_root, self.spec.video, self.spec.crop)
        store.load_frames(records)
        return store, records

    def images(self, personalizer: Personalizer) -> TargetImages:
        """The face crops of the node's adapt, eval and oracle videos (for methods that re-run F)."""
        store, records = self._frame_store()
        split = {s: [r for r in records if r.split == s] for s in ("adapt", "eval", "oracle")}
        return target_images(
            store, personalizer.bundle.extractor, split["adapt"], split["eval"], split["oracle"]
        )

    def frames(self, personalizer: Personalizer, splits: tuple[str, ...]) -> dict[str, FrameSet]:
        """F's features of the node's videos per split (crops and features cached as in ``pft simulate``)."""
        store, records = self._frame_store()
        extractor = personalizer.bundle.extractor
        f_hash = state_dict_sha256(extractor.state_dict())
        by_split: dict[str, list[VideoRecord]] = {}
        for record in records:
            by_split.setdefault(record.split or "train", []).append(record)
        return {
            split: store.frame_set(rs, extractor, f_hash)
            for split, rs in by_split.items()
            if split in splits and any(r.path in store.videos for r in rs)
        }


def spec_path(context: Context) -> Path:
    """The node spec's path: node_config, then run_config, then ``$PFT_FLOWER_SPEC``."""
    for source in (context.node_config, context.run_config):
        value = source.get("pft-spec")
        if isinstance(value, str) and value:
            return Path(value)
    env = os.environ.get(SPEC_ENV)
    if not env:
        raise PFTError(f"no node spec: set node_config 'pft-spec', run_config 'pft-spec' or ${SPEC_ENV}")
    return Path(env)


def node_from_context(context: Context) -> Node:
    """Resolve this node (spec, partition index, person, state folder) from its context."""
    document = json.loads(spec_path(context).read_text())
    spec = NodeSpec.model_validate(document["node"])
    raw_index = context.node_config.get("partition-id", 0)
    if isinstance(raw_index, bool) or not isinstance(raw_index, int | str):
        raise PFTError(f"partition-id must be an integer, got {raw_index!r}")
    index = int(raw_index)
    if not 0 <= index < len(spec.subjects):
        raise PFTError(f"partition-id {index} is outside the {len(spec.subjects)} subjects of the spec")
    subject = spec.subjects[index]
    state = context.node_config.get("state-dir")
    state_dir = Path(state) if isinstance(state, str) and state else spec.state_root / subject
    state_dir.mkdir(parents=True, exist_ok=True)
    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    return Node(spec, index, subject, state_dir)


def _config(message: Message) -> ConfigRecord:
    record = message.content.get(CONFIG_RECORD) if CONFIG_RECORD in message.content else None
    if not isinstance(record, ConfigRecord):
        raise PFTError(f"{message.metadata.message_type}: the message carries no {CONFIG_RECORD!r} record")
    return record


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PFTError(f"config {key!r} must be an integer, got {value!r}")
    return value


def _write_received_bundle(arrays: ArrayRecord, folder: Path) -> None:
    """Write the received files into ``folder`` (names must stay inside it; flat or nested)."""
    for name, array in arrays.items():
        pure = PurePosixPath(name)
        if pure.is_absolute() or not name or any(part in ("", ".", "..") for part in name.split("/")):
            raise BundleTamperedError(f"received bundle names a file outside its folder: {name!r}")
        data = array.numpy()
        if data.dtype != np.uint8 or data.ndim != 1:
            raise BundleTamperedError(f"received bundle file {name!r} is not a byte array")
        target = folder / pure
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.tobytes())


def query(message: Message, context: Context) -> Message:
    """Say whether the node holds the bundle with the digest the server asks about."""
    node = node_from_context(context)
    installed = node.bundle_cache().installed()
    wanted = str(_config(message).get("bundle-digest", ""))
    current = installed is not None and installed.digest == wanted and installed.path.is_dir()
    return metrics_reply(
        message,
        {
            "bundle-current": 1.0 if current else 0.0,
            "bundle-version": installed.bundle_version if installed else 0,
            "subject-index": node.index,
        },
    )


def install(message: Message, context: Context) -> Message:
    """Verify, load and install a received signed bundle (the SDK's ``from_bundle``); a refused
    one raises and the old one stays current."""
    node = node_from_context(context)
    arrays = message.content.get(BUNDLE_RECORD) if BUNDLE_RECORD in message.content else None
    if not isinstance(arrays, ArrayRecord):
        raise PFTError("train.install: the message carries no bundle")
    with tempfile.TemporaryDirectory(prefix=".received-", dir=node.state_dir) as tmp:
        _write_received_bundle(arrays, Path(tmp))
        with Personalizer.from_bundle(
            tmp, node.spec.trusted_key, state_dir=node.state_dir, config=node.client_config()
        ) as personalizer:
            version = personalizer.bundle.bundle_version
    return metrics_reply(message, {"bundle-version": version, "subject-index": node.index})


def enroll_node(node: Node, personalizer: Personalizer) -> EnrollmentReport:
    """Stage 3 on the node's neutral ``adapt`` frames through the SDK (what ``train`` and the
    prior's ``fit`` run), with the personalizer's settings and ledger.

    Raises
    ------
    PFTError
        The node has no usable neutral frames.
    PrivacyBudgetExceededError
        DP is on and the run would exceed the node's budget (nothing was run).
    """
    neutral = node.frames(personalizer, ("adapt",)).get("adapt")
    if neutral is None or len(neutral) == 0:
        raise PFTError(f"node {node.index}: no usable neutral frames to adapt on")
    return personalizer.enroll_features(
        neutral.features,
        neutral.frame_stats,
        video_ids=neutral.video_ids,
        time_index=neutral.time_index,
        descriptor=neutral.mean_descriptor(),
    )


def train_metrics(report: EnrollmentReport, cumulative_epsilon: float | None) -> dict[str, float]:
    """The ``train`` reply's metrics beyond the node's index: the adaptation's cost, the pairing
    fallback, and with DP the release's accounting (public by design) and the ledger's total."""
    metrics: dict[str, float] = {
        "adapt-iterations": report.iterations,
        "adapt-seconds": report.adapt_seconds,
        "neutral-frames": report.frames_used,
        "pairing-fallback": 1.0 if report.pairing_fallback else 0.0,
    }
    release = report.privacy
    if release is not None:
        metrics.update(
            {
                "dp-epsilon": float(release["epsilon"]),
                "dp-noise-multiplier": float(release["noise_multiplier"]),
                "dp-sample-rate": float(release["sample_rate"]),
                "dp-steps": float(release["steps"]),
                "dp-group-size": float(release.get("group_size", 1)),
            }
        )
        if release.get("group_epsilon") is not None:
            metrics["dp-group-epsilon"] = float(release["group_epsilon"])
        if cumulative_epsilon is not None:
            metrics["dp-cumulative-epsilon"] = cumulative_epsilon
    return metrics


def train(message: Message, context: Context) -> Message:
    """Adapt T on the node's neutral ``adapt`` frames and save the personal state on its disk."""
    node = node_from_context(context)
    config = _config(message)
    base = PersonalizeConfig.model_validate_json(str(config["pft-config"]))
    seed = subject_seed(_int(config, "seed"), node.index)
    with node.personalizer(base.model_copy(update={"seed": seed})) as personalizer:
        report = enroll_node(node, personalizer)
        personalizer.save(node.store_key(), owner=node.subject)
        cumulative = None
        if report.privacy is not None:
            cumulative = personalizer.ledger.epsilon(report.privacy["privacy_unit"])
    rounds = context.state.get("node") if "node" in context.state else None
    done = int(float(str(rounds["rounds-trained"]))) if isinstance(rounds, MetricRecord) else 0
    context.state["node"] = MetricRecord({"rounds-trained": done + 1})
    return metrics_reply(message, {**train_metrics(report, cumulative), "subject-index": node.index})


def evaluate(message: Message, context: Context) -> Message:
    """Score one method on the node's held-out labelled ``eval`` frames (simulation only)."""
    node = node_from_context(context)
    config = _config(message)
    method = str(config["method"])
    if method == "pft":  # the person's saved state, checked against the installed bundle
        personalizer = Personalizer.load(
            node.state_dir,
            node.spec.trusted_key,
            node.store_key(),
            owner=node.subject,
            config=node.client_config(),
        )
    else:
        personalizer = node.personalizer()
    with personalizer:
        splits = node.frames(personalizer, ("adapt", "oracle", "eval"))
        held_out = splits.get("eval")
        if held_out is None or len(held_out) == 0:
            raise PFTError(f"node {node.index}: no labelled eval frames")
        if method == "pft":
            logits = personalizer.feature_logits(held_out.features)
            iterations = int(personalizer.enrollment.get("iterations", 0))
            seconds = float(personalizer.enrollment.get("adapt_seconds", 0.0))
        else:  # the source model and the research baselines (e.g. the oracle)
            if method not in method_names() or "adapt" not in splits:  # registered ones included
                raise PFTError(f"node {node.index}: cannot run method {method!r} here")
            settings = MethodSettings.model_validate_json(str(config["method-settings"]))
            target = TargetData(node.subject, splits["adapt"], splits.get("oracle"), held_out)
            if needs_images(method):
                target.images = node.images(personalizer)
            seed = subject_seed(_int(config, "seed"), node.index)
            given = method_input(method, target)
            outcome = METHODS[method](personalizer.source_model, given, settings, seed)
            logits, iterations, seconds = outcome.logits, outcome.iterations, outcome.seconds
        classes = len(personalizer.class_names)
    y = held_out.labels.numpy()
    pred = logits.argmax(1).numpy()
    return metrics_reply(
        message,
        {
            "f1": macro_f1(y, pred, classes),
            "accuracy": accuracy(y, pred),
            "eval-frames": len(held_out),
            "adapt-iterations": iterations,
            "adapt-seconds": seconds,
            "subject-index": node.index,
        },
    )


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp with its four handlers; ``mods`` (e.g. a recorder of replies) wrap them all,
    inside the egress guard (:func:`pft.client.egress.make_egress_guard_mod`: fixed error replies,
    every reply checked and audited)."""
    client_app = ClientApp(mods=[make_egress_guard_mod(), *(mods or [])])
    client_app.query()(query)
    client_app.train("install")(install)
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
