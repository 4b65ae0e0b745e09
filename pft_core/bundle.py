"""The model bundle a device receives: F, C, T0, class names and source style statistics.

Layout of a bundle folder (no pickle anywhere)::

    F.safetensors        feature extractor (torchvision resnet18 keys, no fc)
    C.safetensors        classifier
    T.safetensors        base translator T0
    styles.safetensors   normalizer/{mean,std}, style/<name> (per-source-subject codes and neutral
                         mean/std), descriptor/<subject> (pairing descriptors, not samples)
    config.json          model_config, class_names, extra
    manifest.json        {"format": "pft-bundle/1", "bundle_version", "created", "class_names",
                          "model_config", "files": {name: {"sha256", "bytes"}}}
    manifest.sig         (optional) Ed25519 signature over manifest.json, see ``pft.core.signing``

``load_bundle`` checks every file against the manifest's SHA-256 before using it, and reads the
bytes it checked (no window for a swap between check and load).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pft.core.atomic import atomic_write_text
from pft.core.errors import BundleError, BundleTamperedError
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, StyleNormalizer, Translator
from pft.core.safe_weights import load_safetensors_bytes, save_safetensors
from pft.core.signing import MANIFEST_NAME, SIGNATURE_NAME, read_manifest, write_manifest_files

BUNDLE_FORMAT = "pft-bundle/1"
WEIGHT_FILES = ("F.safetensors", "C.safetensors", "T.safetensors", "styles.safetensors")
CONFIG_FILE = "config.json"
BUNDLE_FILES = (*WEIGHT_FILES, CONFIG_FILE)


@dataclass
class Bundle:
    """A loaded bundle: the parts built from ``model_config`` and the bundle's weights (eval mode)."""

    extractor: FeatureExtractor
    classifier: Classifier
    translator: Translator
    normalizer: StyleNormalizer
    model_config: ModelConfig
    class_names: list[str]
    source_styles: dict[str, Tensor]
    descriptors: dict[str, np.ndarray]
    bundle_version: int
    manifest: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_bundle(
    folder: str | Path,
    *,
    extractor: FeatureExtractor,
    classifier: Classifier,
    translator: Translator,
    normalizer: StyleNormalizer,
    model_config: ModelConfig,
    class_names: list[str],
    source_styles: Mapping[str, Tensor],
    descriptors: Mapping[str, np.ndarray],
    bundle_version: int = 1,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a bundle folder (see the module docstring) and return its path.

    ``source_styles`` maps names such as ``code/<subject>``, ``neutral_mean/<subject>`` to tensors
    (``training.SourceStyles.as_tensors()``); ``descriptors`` maps source subjects to pairing
    descriptors. The folder must be new or hold only a previous bundle's files.
    """
    folder = Path(folder)
    if len(class_names) != model_config.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model_config.num_classes} classes")
    if folder.exists():
        stray = [
            p.name for p in folder.iterdir() if p.name not in (*BUNDLE_FILES, MANIFEST_NAME, SIGNATURE_NAME)
        ]
        if stray:
            raise BundleError(
                f"{folder}: refusing to write a bundle into a folder holding {sorted(stray)[:5]}"
            )
        (folder / SIGNATURE_NAME).unlink(missing_ok=True)  # an old signature would not match
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(extractor.state_dict(), folder / "F.safetensors")
    save_safetensors(classifier.state_dict(), folder / "C.safetensors")
    save_safetensors(translator.state_dict(), folder / "T.safetensors")
    styles: dict[str, Tensor] = {f"normalizer/{k}": v for k, v in normalizer.state_dict().items()}
    styles.update({f"style/{k}": v for k, v in source_styles.items()})
    styles.update({f"descriptor/{k}": torch.as_tensor(np.asarray(v)) for k, v in descriptors.items()})
    save_safetensors(styles, folder / "styles.safetensors")
    config_json = {
        "model_config": model_config.model_dump(mode="json"),
        "class_names": list(class_names),
        "extra": extra or {},
    }
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "bundle_version": int(bundle_version),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "model_config": model_config.model_dump(mode="json"),
    }
    write_manifest_files(folder, manifest)
    return folder


def _checked_bytes(folder: Path, files: Mapping[str, Any], name: str) -> bytes:
    entry = files.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise BundleTamperedError(f"{folder}: the manifest does not list {name!r}")
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError as exc:
        raise BundleTamperedError(f"{folder}: listed file {name!r} is missing") from exc
    if len(data) != entry.get("bytes") or _digest(data) != entry["sha256"]:
        raise BundleTamperedError(
            f"{folder}: {name!r} does not match its SHA-256 in the manifest; re-download it"
        )
    return data


def load_bundle(folder: str | Path, manifest: dict[str, Any] | None = None) -> Bundle:
    """Load a bundle after checking every file's SHA-256 against the manifest.

    Parameters
    ----------
    folder : the bundle folder.
    manifest : a manifest already verified by ``pft.core.signing.verify_bundle`` (recommended on a
        device); without it ``manifest.json`` is read (digests checked, signature NOT checked).

    Raises
    ------
    BundleTamperedError : a file is missing or its digest differs from the manifest.
    BundleError : the manifest is unreadable or of another format.
    """
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder)
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{folder}: unknown bundle format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleTamperedError(f"{folder}: the manifest has no 'files' table")
    blobs = {name: _checked_bytes(folder, files, name) for name in BUNDLE_FILES}
    config_json = json.loads(blobs[CONFIG_FILE].decode("utf-8"))
    model_config = ModelConfig.model_validate(config_json["model_config"])
    if config_json["model_config"] != manifest.get("model_config"):
        raise BundleTamperedError(f"{folder}: config.json and manifest.json disagree on model_config")
    weights = {name: load_safetensors_bytes(blobs[name], str(folder / name)) for name in WEIGHT_FILES}
    extractor = FeatureExtractor(model_config)
    classifier = Classifier(model_config)
    translator = Translator(model_config)
    try:
        extractor.load_state_dict(weights["F.safetensors"], strict=True)
        classifier.load_state_dict(weights["C.safetensors"], strict=True)
        translator.load_state_dict(weights["T.safetensors"], strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{folder}: weights do not fit the bundle's model_config ({exc})") from exc
    styles = weights["styles.safetensors"]
    normalizer = StyleNormalizer(model_config.style_dim)
    normalizer.load_state_dict({"mean": styles["normalizer/mean"], "std": styles["normalizer/std"]})
    source_styles = {k[len("style/") :]: v for k, v in styles.items() if k.startswith("style/")}
    descriptors = {
        k[len("descriptor/") :]: v.numpy() for k, v in styles.items() if k.startswith("descriptor/")
    }
    for m in (extractor, classifier, translator, normalizer):
        m.eval()
    return Bundle(
        extractor=extractor,
        classifier=classifier,
        translator=translator,
        normalizer=normalizer,
        model_config=model_config,
        class_names=list(config_json["class_names"]),
        source_styles=source_styles,
        descriptors=descriptors,
        bundle_version=int(manifest["bundle_version"]),
        manifest=manifest,
        extra=dict(config_json.get("extra", {})),
        folder=folder,
    )
