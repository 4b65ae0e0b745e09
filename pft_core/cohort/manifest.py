"""The cohort manifest: subjects with their ground-truth traits and every video with its digest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pft.core.atomic import atomic_write_text
from pft.core.errors import DatasetLayoutError

MANIFEST_FORMAT = "pft-cohort/1"
Split = Literal["train", "adapt", "oracle", "eval"]


class SubjectInfo(BaseModel):
    """One subject and the generator's ground truth about them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    index: int
    role: Literal["source", "target"]
    age_group: Literal["young", "adult", "elderly"]
    expressiveness: float
    resting_leans: bool  # the neutral face leans toward an expressive class
    resting_offset_strength: float
    resting_aus: dict[str, float]
    style: dict[str, dict[str, float]]  # class -> action -> apex weight
    traits: dict[str, float | str | bool]  # identity cues: glasses, wrinkles, skin tone, ...


class VideoEntry(BaseModel):
    """One clip: where it is, whose it is, what it shows and its SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative to the cohort folder
    sidecar: str  # the <stem>.faces.json beside it
    subject: str
    label: str  # class name
    label_index: int  # index into CohortManifest.classes
    split: Split
    clip: int
    frames: int
    fps: int
    apex_intensity: float  # 0 for neutral clips
    sha256: str


class CohortManifest(BaseModel):
    """Everything a loader needs to know about a generated cohort."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["pft-cohort/1"] = "pft-cohort/1"
    generator_version: int = 1  # pft.core.cohort.config.GENERATOR_VERSION of the code that made it
    profile: str
    seed: int
    config: dict[str, Any]
    classes: list[str]
    frame_size: int
    fps: int
    frames_per_clip: int
    subjects: list[SubjectInfo]
    videos: list[VideoEntry]

    def videos_of(
        self, subject: str | None = None, split: Split | None = None, label: str | None = None
    ) -> list[VideoEntry]:
        """The videos matching every given filter."""
        return [
            v
            for v in self.videos
            if (subject is None or v.subject == subject)
            and (split is None or v.split == split)
            and (label is None or v.label == label)
        ]

    def subjects_of(self, role: Literal["source", "target"]) -> list[SubjectInfo]:
        """Subjects with the given role."""
        return [s for s in self.subjects if s.role == role]

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of videos per split and class."""
        out: dict[str, dict[str, int]] = {}
        for v in self.videos:
            out.setdefault(v.split, {}).setdefault(v.label, 0)
            out[v.split][v.label] += 1
        return out

    def write(self, cohort_dir: Path) -> Path:
        """Write ``manifest.json`` atomically (it is the cohort's commit marker)."""
        return atomic_write_text(
            Path(cohort_dir) / "manifest.json", json.dumps(self.model_dump(mode="json"), indent=1) + "\n"
        )


def load_manifest(cohort_dir: str | Path) -> CohortManifest:
    """Read and validate ``cohort_dir/manifest.json``.

    Raises
    ------
    DatasetLayoutError
        If the folder has no manifest or it is not a ``pft-cohort/1`` manifest.
    """
    path = Path(cohort_dir) / "manifest.json"
    if not path.is_file():
        raise DatasetLayoutError(f"{cohort_dir}: no manifest.json; make a cohort with `pft cohort make`")
    try:
        return CohortManifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DatasetLayoutError(f"{path}: not a valid pft-cohort/1 manifest ({exc})") from exc
