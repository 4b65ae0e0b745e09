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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError
from torch import Tensor

from pft.core.atomic import atomic_write_text
from pft.core.errors import BundleError, BundleTamperedError
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, StyleNormalizer, Translator
from pft.core.safe_weights import load_safetensors_bytes, save_safetensors
from pft.core.signing import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    TrustedBundleCache,
    read_manifest,
    write_manifest_files,
)
from pft.core.untrusted_json import parse_untrusted_json

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


#: Largest ``config.json`` accepted (it is digest-checked, but parsed with limits all the same).
MAX_CONFIG_BYTES = 1 << 20
#: The per-subject entries of ``styles.safetensors`` (``style/<kind>/<subject>``): the kinds
#: ``pft.core.training.SourceStyles.from_tensors`` reads; keep the two in step.
_STYLE_KINDS = ("code", "neutral_mean", "neutral_std", "neutral_confidence")


def _check_module_weights(where: str, tensors: Mapping[str, Tensor], module: torch.nn.Module) -> None:
    """Every tensor has the name, shape and dtype the module holds, and floating ones are finite.

    ``load_state_dict`` would silently cast float16/int64 weights and accept NaN; a device must
    refuse them instead (its predictions would be garbage).
    """
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{where}: weights do not fit the bundle's model_config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for key, tensor in tensors.items():
        want = expected[key]
        if tensor.dtype != want.dtype:
            raise BundleError(f"{where}: tensor {key!r} is {tensor.dtype}, the model needs {want.dtype}")
        if tensor.shape != want.shape:
            raise BundleError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the model needs {tuple(want.shape)}"
            )
        _check_finite(where, key, tensor)


def _check_finite(where: str, key: str, tensor: Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BundleError(f"{where}: tensor {key!r} holds NaN or infinite values")


def _check_styles(where: str, styles: Mapping[str, Tensor], model_config: ModelConfig) -> None:
    """The styles file: the normaliser, per-subject style entries and pairing descriptors, all finite."""
    for key in ("normalizer/mean", "normalizer/std"):
        tensor = styles.get(key)
        if (
            tensor is None
            or tensor.dtype != torch.float32
            or tuple(tensor.shape) != (model_config.style_dim,)
        ):
            raise BundleError(f"{where}: {key!r} must be float32 of shape ({model_config.style_dim},)")
    if not bool((styles["normalizer/std"] > 0).all()):
        raise BundleError(f"{where}: 'normalizer/std' must be positive")
    subjects: set[str] = set()
    descriptor_sizes: set[int] = set()
    for key, tensor in styles.items():
        group, _, rest = key.partition("/")
        if group == "normalizer" and rest in ("mean", "std"):
            pass
        elif group == "style":
            kind, _, subject = rest.partition("/")
            if kind not in _STYLE_KINDS or not subject:
                raise BundleError(f"{where}: unknown style entry {key!r}")
            if tensor.dtype != torch.float32 or tensor.ndim != 1:
                raise BundleError(
                    f"{where}: {key!r} must be a float32 vector, got {tensor.dtype} {tuple(tensor.shape)}"
                )
            subjects.add(subject)
        elif group == "descriptor" and rest:
            if tensor.dtype not in (torch.float32, torch.float64) or tensor.ndim != 1:
                raise BundleError(f"{where}: {key!r} must be a float vector, got {tensor.dtype}")
            descriptor_sizes.add(int(tensor.shape[0]))
        else:
            raise BundleError(f"{where}: unexpected entry {key!r}")
        _check_finite(where, key, tensor)
    if not subjects:
        raise BundleError(f"{where}: no source subject styles ('style/<kind>/<subject>')")
    if len(descriptor_sizes) > 1:
        raise BundleError(f"{where}: pairing descriptors of different lengths {sorted(descriptor_sizes)}")


def _read_config(
    folder: Path, data: bytes, manifest: Mapping[str, Any]
) -> tuple[ModelConfig, list[str], dict[str, Any]]:
    """``config.json``: its schema checked (model_config, class names, extra), typed errors only."""
    where = str(folder / CONFIG_FILE)
    document = parse_untrusted_json(
        data, where=where, error=BundleError, max_bytes=MAX_CONFIG_BYTES, what="config"
    )
    if not isinstance(document, dict) or not isinstance(document.get("model_config"), dict):
        raise BundleError(f"{where}: needs a 'model_config' object")
    try:
        model_config = ModelConfig.model_validate(document["model_config"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(
            f"{where}: invalid model_config ({'.'.join(map(str, first['loc']))}: {first['msg']})"
        ) from exc
    if document["model_config"] != manifest.get("model_config"):
        raise BundleTamperedError(f"{folder}: config.json and manifest.json disagree on model_config")
    names = document.get("class_names")
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
        or len(names) != model_config.num_classes
    ):
        raise BundleError(f"{where}: 'class_names' must be {model_config.num_classes} distinct names")
    extra = document.get("extra", {})
    if not isinstance(extra, dict):
        raise BundleError(f"{where}: 'extra' must be an object")
    return model_config, list(names), dict(extra)


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
    model_config, class_names, extra = _read_config(folder, blobs[CONFIG_FILE], manifest)
    weights = {name: load_safetensors_bytes(blobs[name], str(folder / name)) for name in WEIGHT_FILES}
    extractor = FeatureExtractor(model_config)
    classifier = Classifier(model_config)
    translator = Translator(model_config)
    for name, module in (
        ("F.safetensors", extractor),
        ("C.safetensors", classifier),
        ("T.safetensors", translator),
    ):
        _check_module_weights(str(folder / name), weights[name], module)
        module.load_state_dict(weights[name], strict=True)
    styles = weights["styles.safetensors"]
    _check_styles(str(folder / "styles.safetensors"), styles, model_config)
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
        class_names=class_names,
        source_styles=source_styles,
        descriptors=descriptors,
        bundle_version=int(manifest["bundle_version"]),
        manifest=manifest,
        extra=extra,
        folder=folder,
    )


def validate_bundle(folder: str | Path, manifest: dict[str, Any]) -> None:
    """The full check a device runs before a bundle may become current: :func:`load_bundle`.

    Signature and digests are :func:`~pft.core.signing.verify_bundle`'s job; this adds the rest:
    the config's schema, every weight's name, shape and dtype, finite values, pickle-free files.

    Raises
    ------
    BundleError, UnsafeWeightsError
        The bundle cannot be used (nothing is installed when this runs as a cache validator).
    """
    load_bundle(folder, manifest)


def verified_bundle_cache(cache_root: str | Path, trusted_public_key: Ed25519PublicKey) -> TrustedBundleCache:
    """A device's bundle cache that installs only bundles :func:`validate_bundle` accepts.

    The SDK and the Flower node both install through it, so a validly signed bundle the device
    cannot load (pickled or NaN weights, wrong shapes or dtypes, a broken config) never becomes
    current, and the good older one stays installed (it is not then refused as a rollback).
    """
    return TrustedBundleCache(cache_root, trusted_public_key, validator=validate_bundle)
