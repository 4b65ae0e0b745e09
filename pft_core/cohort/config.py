"""The cohort generator's configuration (validated before any work starts)."""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, field_validator

from pft.core.cohort.profiles import BUILTIN_PROFILES, ClipCounts, ProfileSpec, get_profile, known_profile
from pft.core.config import FrozenConfig

#: Version of what the generator draws for a given config (renderer, animation, profiles). It is
#: part of ``CohortConfig.config_hash`` and of every manifest, so a cache keyed by the hash never
#: serves videos an older generator made. Bump it whenever the same config would render differently.
#: 3: larger eyes, mouth and lips; larger lip-press, lid-tightening and brow-lowering effects; short
#: onsets and offsets; mixed dynamics that cover the clip; stronger stress/ambivalence prototypes;
#: expressiveness from 0.5 (x0.75 for elderly subjects); 6 oracle clips per class.
#: 4: mixed bursts show at least two conflicting actions at once; 8 oracle clips per class;
#: affwild2's apex intensity from 0.65 and somewhat milder capture (yaw 20, noise <= 6, blur <= 0.9,
#: occluders in 25 % of clips).
#: 5: biovid's resting lean looks like mild pain (brow lowering, lid tightening, cheek raise, nose
#: wrinkle, upper-lip raise).
#: 6: stronger resting leans (biovid 45 % of subjects at 0.6-1.0, others 0.45-0.8), biovid apex
#: intensity from 0.4 (mild pain overlaps another person's leaning neutral), affwild2 apex from 0.7
#: with noise <= 5, blur <= 0.8 and occluders in 20 % of clips.
#: 7: affwild2's capture milder again (sensor noise <= 4, blur <= 0.6, occluders in 10 % of clips):
#: on v6 even the person's own supervised oracle stayed below 85 on affwild2 (validation 82.4,
#: test 84.0); the other profiles render as in v6.
GENERATOR_VERSION = 7


class CohortConfig(FrozenConfig):
    """What cohort to make.

    ``source_subjects`` / ``target_subjects`` of ``None`` take the profile's default (biovid 77+10,
    stressid 44+10, bah 214+10, affwild2 282+10). ``light`` makes fewer, shorter, smaller clips
    through the same pipeline, for cohorts of tens of thousands of subjects.
    """

    profile: str = "biovid"
    """A built-in profile (biovid, stressid, bah, affwild2) or a registered one."""
    seed: int = Field(default=0, ge=0)
    source_subjects: int | None = Field(default=None, ge=1)
    target_subjects: int | None = Field(default=None, ge=1)
    frame_size: int = Field(default=96, ge=48, le=256)
    fps: int = Field(default=8, ge=1, le=60)
    frames_per_clip: int = Field(default=16, ge=2, le=256)
    light: bool = False
    workers: int | None = Field(default=None, ge=1)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return known_profile(value)

    @field_validator("frame_size")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError("frame_size must be even (H.264 yuv420p needs even sizes)")
        return value

    def config_hash(self) -> str:
        """A stable short hash of the config and :data:`GENERATOR_VERSION` (the cohort cache key);
        for a registered profile, of its whole spec too (a changed knob is a new cohort)."""
        fields = {"generator": GENERATOR_VERSION, **self.model_dump(mode="json")}
        if self.profile not in BUILTIN_PROFILES:
            fields["profile_spec"] = self.spec.model_dump(mode="json")
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def spec(self) -> ProfileSpec:
        """The profile definition with all its knobs."""
        return get_profile(self.profile)

    @property
    def n_source(self) -> int:
        """Resolved number of source subjects."""
        return self.source_subjects if self.source_subjects is not None else self.spec.source_subjects

    @property
    def n_target(self) -> int:
        """Resolved number of target subjects."""
        return self.target_subjects if self.target_subjects is not None else self.spec.target_subjects

    @property
    def clip_size(self) -> int:
        """Effective frame size (light mode caps it at 64 px)."""
        return min(self.frame_size, 64) if self.light else self.frame_size

    @property
    def clip_frames(self) -> int:
        """Effective frames per clip (light mode caps it at 8)."""
        return min(self.frames_per_clip, 8) if self.light else self.frames_per_clip

    @property
    def clip_counts(self) -> ClipCounts:
        """Clips per split for this mode."""
        return self.spec.light_clips if self.light else self.spec.clips
