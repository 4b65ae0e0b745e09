"""The synthetic face-video cohort: the project's embedded default data (docs/cohort.md).

Rendered faces with identities, facial actions over time, personal resting faces and expression
styles, and capture conditions, written as H.264 videos with per-frame ground truth sidecars and a
manifest, for four profiles that mimic BioVid, StressID, BAH and Aff-Wild2 (and registered ones:
:func:`register_profile`).
"""

from pft.core.cohort.config import CohortConfig
from pft.core.cohort.generate import make_cohort
from pft.core.cohort.manifest import CohortManifest, SubjectInfo, VideoEntry, load_manifest
from pft.core.cohort.preview import preview_cohort
from pft.core.cohort.profiles import (
    AU_NAMES,
    BUILTIN_PROFILES,
    PROFILES,
    ProfileSpec,
    get_profile,
    known_profile,
    profile_names,
    register_profile,
)

__all__ = [
    "AU_NAMES",
    "BUILTIN_PROFILES",
    "PROFILES",
    "CohortConfig",
    "CohortManifest",
    "ProfileSpec",
    "SubjectInfo",
    "VideoEntry",
    "get_profile",
    "known_profile",
    "load_manifest",
    "make_cohort",
    "preview_cohort",
    "profile_names",
    "register_profile",
]
