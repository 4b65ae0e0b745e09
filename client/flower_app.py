"""The Flower ClientApp: a thin adapter between Flower messages and on-device personalisation.

One node is one person (a device, or a virtual node of the simulation). Message types:

- ``query``: which bundle do you hold? (reply: ``bundle-current`` 0/1 for the digest asked about)
- ``train.install``: here is a signed bundle (its files as a uint8 ArrayRecord); the node
  verifies it against its trusted key with :class:`~pft.core.signing.TrustedBundleCache`
  (refusing tampered, unsigned-extra-file and rolled-back bundles and keeping the one it had).
- ``train``: adapt the translator T on the node's NEUTRAL videos with
  :func:`pft.core.personalize.personalize`; T is saved encrypted on the node's disk
  (:class:`pft.client.store.EncryptedStore`, atomic, survives restarts).
- ``evaluate``: where the node has labelled ``eval`` videos (the simulation), score a method.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from pft.client.egress import make_egress_guard_mod, metrics_reply
from pft.client.store import EncryptedStore, StoreKey
from pft.core.bundle import Bundle, load_bundle, verified_bundle_cache
from pft.core.config import FrozenConfig
from pft.core.data import FaceCropConfig, VideoConfig
from pft.core.data.cache import state_dict_sha256
from pft.core.errors import BundleTamperedError, PFTError
from pft.core.metrics import accuracy, macro_f1
from pft.core.models import Translator
from pft.core.personalize import Personalization, PersonalizeConfig, SourceModel, personalize
from pft.core.signing import TrustedBundleCache, load_public_key
from pft.core.training import SourceStyles

if TYPE_CHECKING:
    from pft.simulations.workspace import FrameSet

SPEC_ENV = "PFT_FLOWER_SPEC"
CONFIG_RECORD = "config"
BUNDLE_RECORD = "bundle"
TRANSLATOR_STORE = "translator.store"


class NodeSpec(FrozenConfig):
    """Where a node finds its data, keys and disk.

    ``subjects[k]`` is the person of the node with ``partition-id`` k (the simulation: the k-th
    target subject in sorted order, which also gives the adaptation seed ``seed * 1000 + k``).
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


@dataclass(frozen=True)
class Node:
    """This node: its spec, its index and person, and its own folder."""

    spec: NodeSpec
    index: int
    subject: str
    state_dir: Path

    def bundle_cache(self) -> TrustedBundleCache:
        """The node's trusted bundle cache: verifies against the spec's public key and fully loads a
        bundle before it becomes current (the SDK's check)."""
        return verified_bundle_cache(self.state_dir / "bundles", load_public_key(self.spec.trusted_key))

    def translator_store(self) -> EncryptedStore:
        """The encrypted on-disk store of the node's personal translator."""
        return EncryptedStore(self.state_dir / TRANSLATOR_STORE, StoreKey.from_file(self.spec.store_key_file))


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


def source_model(bundle: Bundle) -> SourceModel:
    """The parts personalisation needs, built from a verified bundle (as the in-process engine)."""
    return SourceModel(
        bundle.classifier,
        bundle.translator,
        bundle.normalizer,
        SourceStyles.from_tensors(bundle.source_styles),
        {k: np.asarray(v) for k, v in bundle.descriptors.items()},
        bundle.extra.get("pairing", "cosine"),
    )


def installed_bundle(node: Node) -> Bundle:
    """Verify the node's current bundle again and load it through the verified manifest."""
    folder, manifest = node.bundle_cache().load_current()
    return load_bundle(folder, manifest)


def subject_frames(node: Node, bundle: Bundle, splits: tuple[str, ...]) -> dict[str, FrameSet]:
    """F's features of the node's videos per split (crops and features cached as in ``pft simulate``)."""
    from pft.core.data import load_dataset
    from pft.simulations.workspace import FrameStore

    index = load_dataset(node.spec.dataset_root, node.spec.layout)
    records = index.by_subject().get(node.subject, [])
    store = FrameStore(index, node.spec.cache_root, node.spec.video, node.spec.crop)
    store.load_frames(records)
    f_hash = state_dict_sha256(bundle.extractor.state_dict())
    by_split: dict[str, list[Any]] = {}
    for record in records:
        by_split.setdefault(record.split or "train", []).append(record)
    return {
        split: store.frame_set(rs, bundle.extractor, f_hash)
        for split, rs in by_split.items()
        if split in splits and any(r.path in store.videos for r in rs)
    }


def subject_images(node: Node, bundle: Bundle) -> Any:
    """The face crops of the node's adapt, eval and oracle videos (for methods that re-run F)."""
    from pft.core.data import load_dataset
    from pft.simulations.methods import target_images
    from pft.simulations.workspace import FrameStore

    index = load_dataset(node.spec.dataset_root, node.spec.layout)
    records = index.by_subject().get(node.subject, [])
    store = FrameStore(index, node.spec.cache_root, node.spec.video, node.spec.crop)
    store.load_frames(records)
    split = {s: [r for r in records if r.split == s] for s in ("adapt", "eval", "oracle")}
    return target_images(store, bundle.extractor, split["adapt"], split["eval"], split["oracle"])


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
    """Verify and install a received signed bundle; a refused one raises and the old one stays."""
    node = node_from_context(context)
    arrays = message.content.get(BUNDLE_RECORD) if BUNDLE_RECORD in message.content else None
    if not isinstance(arrays, ArrayRecord):
        raise PFTError("train.install: the message carries no bundle")
    cache = node.bundle_cache()
    with tempfile.TemporaryDirectory(prefix=".received-", dir=node.state_dir) as tmp:
        _write_received_bundle(arrays, Path(tmp))
        cache.install(tmp)
    installed = cache.installed()
    assert installed is not None
    return metrics_reply(message, {"bundle-version": installed.bundle_version, "subject-index": node.index})


def personalize_node(
    node: Node, bundle: Bundle, config: PersonalizeConfig, seed: int
) -> tuple[Personalization, int]:
    """Stage 3 on the node's neutral ``adapt`` frames (what ``train`` and the prior's ``fit`` run);
    returns the personalisation and how many neutral frames it used.

    Raises
    ------
    PFTError
        The node has no usable neutral frames.
    """
    neutral = subject_frames(node, bundle, ("adapt",)).get("adapt")
    if neutral is None or len(neutral) == 0:
        raise PFTError(f"node {node.index}: no usable neutral frames to adapt on")
    result = personalize(
        source_model(bundle),
        neutral.features,
        neutral.frame_stats,
        config.model_copy(update={"seed": seed}),
        descriptor=neutral.mean_descriptor(),
        video_ids=neutral.video_ids,
        time_index=neutral.time_index,
    )
    return result, len(neutral)


def train(message: Message, context: Context) -> Message:
    """Adapt T on the node's neutral ``adapt`` frames and save it encrypted on the node's disk."""
    node = node_from_context(context)
    config = _config(message)
    base = PersonalizeConfig.model_validate_json(str(config["pft-config"]))
    seed = _int(config, "seed") * 1000 + node.index
    bundle = installed_bundle(node)
    result, neutral_frames = personalize_node(node, bundle, base, seed)
    node.translator_store().save(
        {
            "translator": dict(result.translator.state_dict()),
            "style_target": result.style_target,
            "style_reference": result.style_reference,
            "reference_subject": result.reference_subject,
            "bundle_digest": node.bundle_cache().installed().digest,  # type: ignore[union-attr]
            "iterations": int(result.result.iterations),
            "seconds": float(result.result.seconds),
        },
        owner=node.subject,
    )
    rounds = context.state.get("node") if "node" in context.state else None
    done = int(float(str(rounds["rounds-trained"]))) if isinstance(rounds, MetricRecord) else 0
    context.state["node"] = MetricRecord({"rounds-trained": done + 1})
    return metrics_reply(
        message,
        {
            "adapt-iterations": int(result.result.iterations),
            "adapt-seconds": float(result.result.seconds),
            "neutral-frames": neutral_frames,
            "subject-index": node.index,
        },
    )


def _personal_logits(node: Node, bundle: Bundle, features: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """``C(T(f))`` with the node's stored personal translator."""
    payload = node.translator_store().load(owner=node.subject)
    translator = Translator(bundle.model_config)
    translator.load_state_dict(payload["translator"], strict=True)
    translator.eval()
    bundle.classifier.eval()
    with torch.no_grad():
        translated = translator(features, payload["style_target"], payload["style_reference"])
        logits = bundle.classifier(translated)
    return logits, int(payload["iterations"]), float(payload["seconds"])


def evaluate(message: Message, context: Context) -> Message:
    """Score one method on the node's held-out labelled ``eval`` frames (simulation only)."""
    node = node_from_context(context)
    config = _config(message)
    method = str(config["method"])
    bundle = installed_bundle(node)
    splits = subject_frames(node, bundle, ("adapt", "oracle", "eval"))
    held_out = splits.get("eval")
    if held_out is None or len(held_out) == 0:
        raise PFTError(f"node {node.index}: no labelled eval frames")
    iterations, seconds = 0, 0.0
    if method == "pft":
        logits, iterations, seconds = _personal_logits(node, bundle, held_out.features)
    elif method == "source_only":
        bundle.classifier.eval()
        with torch.no_grad():
            logits = bundle.classifier(held_out.features)
    else:  # research baselines (e.g. the oracle) run the simulation's method runners
        from pft.simulations.methods import IMAGE_METHODS, METHODS, MethodSettings, TargetData

        if method not in METHODS or "adapt" not in splits:
            raise PFTError(f"node {node.index}: cannot run method {method!r} here")
        settings = MethodSettings.model_validate_json(str(config["method-settings"]))
        target = TargetData(node.subject, splits["adapt"], splits.get("oracle"), held_out)
        if method in IMAGE_METHODS:
            target.images = subject_images(node, bundle)
        seed = _int(config, "seed") * 1000 + node.index
        outcome = METHODS[method](source_model(bundle), target, settings, seed)
        logits, iterations, seconds = outcome.logits, outcome.iterations, outcome.seconds
    y = held_out.labels.numpy()
    pred = logits.argmax(1).numpy()
    return metrics_reply(
        message,
        {
            "f1": macro_f1(y, pred, len(bundle.class_names)),
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
