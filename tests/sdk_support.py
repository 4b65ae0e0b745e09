"""Shared inputs of the SDK tests: a tiny synthetic cohort, a signing key and a small signed bundle.

The bundle is built from real parts: F, C, T random-initialised at a small size (width 8, 32-px
crops), the style normaliser, source styles and pairing descriptors computed by
``pft.core.training.source_styles`` from F's features of the cohort's source subjects.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pft.core.cohort import CohortConfig, make_cohort
from pft.core.data import (
    DatasetIndex,
    load_dataset,
)
from pft.core.models import ModelConfig
from pft.core.signing import generate_signing_key, save_public_key
from pft.simulations.bench_sdk import build_demo_bundle

SDK_MODEL = ModelConfig(width=8, image_size=32, num_classes=2, translator_hidden=32, style_embed_dim=8)


@dataclass
class SdkWorld:
    """What the SDK tests share (read-only: copy a bundle before changing it)."""

    root: Path
    cohort: Path
    index: DatasetIndex
    key: Ed25519PrivateKey
    public_pem: Path
    bundle_v1: Path
    bundle_v2: Path

    def target_videos(self, split: str = "adapt", label: str | None = None) -> list[Path]:
        """The target subject's videos of one split (and class)."""
        return [r.path for r in self.index.filter(role="target", split=split, label=label).records]

    def copy_bundle(self, dest: Path, which: int = 1) -> Path:
        """A private copy of bundle v1 or v2."""
        return Path(shutil.copytree(self.bundle_v1 if which == 1 else self.bundle_v2, dest))


def build_bundle(
    index: DatasetIndex, out: Path, key: Ed25519PrivateKey, *, version: int = 1, seed: int = 0
) -> Path:
    """A small signed bundle for ``index``'s source subjects (see the module docstring)."""
    return build_demo_bundle(index, out, key, SDK_MODEL, version=version, seed=seed)


def make_world(root: Path) -> SdkWorld:
    """Cohort (3 source + 1 target subjects, light clips), key pair and bundles v1 and v2."""
    cohort = root / "cohort"
    make_cohort(
        CohortConfig(profile="biovid", seed=0, source_subjects=3, target_subjects=1, light=True, workers=1),
        cohort,
    )
    index = load_dataset(cohort, "synthetic")
    key = generate_signing_key()
    public_pem = save_public_key(key.public_key(), root / "keys" / "bundle-signing.pub")
    v1 = build_bundle(index, root / "bundles" / "v1", key, version=1, seed=0)
    v2 = build_bundle(index, root / "bundles" / "v2", key, version=2, seed=1)
    return SdkWorld(root, cohort, index, key, public_pem, v1, v2)


_SHARED: list[SdkWorld] = []


def shared_world(factory: pytest.TempPathFactory) -> SdkWorld:
    """One world per test session, shared by every SDK test module (made on first use)."""
    if not _SHARED:
        _SHARED.append(make_world(factory.mktemp("sdk-world")))
    return _SHARED[0]
