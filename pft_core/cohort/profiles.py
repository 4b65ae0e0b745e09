"""Cohort profiles: classes, sizes and every difficulty knob of the synthetic cohort (docs/cohort.md).

A profile mimics one of the paper's datasets (BioVid, StressID, BAH, Aff-Wild2) in its classes,
its subtlety and its size. All knobs that shape the personalisation gap (how many subjects have a
resting face that leans toward an expressive class, how strongly, how expressive people are, how
much capture conditions vary) live here as data, so the gap can be tuned without touching the
renderer.

:data:`PROFILES` holds the four built-in profiles and those added from outside the package with
:func:`register_profile` or the ``pft.profiles`` entry-point group (docs/extending.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pft.core.config import FrozenConfig
from pft.core.plugins import NAME_PATTERN, PROFILES_GROUP, PluginError, check_name, load_entry_points

#: the built-in profiles' names (a registered profile may have any other valid name)
ProfileName = Literal["biovid", "stressid", "bah", "affwild2"]

#: The facial actions the renderer draws (FACS-like action units, each 0..1).
AU_NAMES: tuple[str, ...] = (
    "AU1",  # inner brow raiser
    "AU2",  # outer brow raiser
    "AU4",  # brow lowerer
    "AU5",  # upper lid raiser
    "AU6",  # cheek raiser
    "AU7",  # lid tightener
    "AU9",  # nose wrinkler
    "AU10",  # upper lip raiser
    "AU12",  # lip corner puller
    "AU15",  # lip corner depressor
    "AU20",  # lip stretcher
    "AU24",  # lip pressor
    "AU25",  # lips part
    "AU26",  # jaw drop
    "AU43",  # eyes closed
)

#: Alternatives a person may use instead of a prototype action (personal expression style).
AU_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    "AU1": ("AU2",),
    "AU2": ("AU1", "AU5"),
    "AU4": ("AU7",),
    "AU5": ("AU2",),
    "AU6": ("AU7",),
    "AU7": ("AU6", "AU43"),
    "AU9": ("AU10",),
    "AU10": ("AU9", "AU20"),
    "AU12": ("AU6", "AU25"),
    "AU15": ("AU20", "AU24"),
    "AU20": ("AU15",),
    "AU24": ("AU15", "AU20"),
    "AU25": ("AU26",),
    "AU26": ("AU25",),
    "AU43": ("AU7",),
}


class Range(FrozenConfig):
    """A closed interval ``[lo, hi]`` a value is drawn from uniformly."""

    lo: float
    hi: float


def _r(lo: float, hi: float) -> Range:
    return Range(lo=lo, hi=hi)


class ExpressionSpec(FrozenConfig):
    """How one class shows on a face and in behaviour over a clip.

    ``aus`` are prototype action weights at apex; ``dynamics`` is ``"sustained"`` (one onset, a long
    apex, an offset) or ``"mixed"`` (brief, possibly conflicting bursts per action).
    """

    aus: dict[str, float] = Field(default_factory=dict)
    dynamics: Literal["sustained", "mixed"] = "sustained"
    blink_rate: float = 0.25  # blinks per second
    gaze_aversion: float = 0.0  # probability that gaze turns away in a clip
    head_shake: float = 0.0  # yaw oscillation amplitude, degrees
    head_nod: float = 0.0  # pitch oscillation amplitude, degrees
    head_motion: float = 1.5  # slow random head drift amplitude, degrees


class CaptureSpec(FrozenConfig):
    """Capture conditions: ranges per subject (base) and per session (jitter around the base)."""

    yaw: float = 8.0  # |degrees| of base head yaw
    pitch: float = 6.0
    roll: float = 6.0
    scale_jitter: float = 0.06  # relative face-size change between clips
    frame_jitter: float = 0.015  # per-frame position/scale jitter, fraction of the frame
    shift: float = 0.05  # face-centre offset per clip, fraction of the frame
    light_level: Range = _r(0.75, 1.15)
    light_gradient: Range = _r(0.05, 0.45)  # strength of directional light across the frame
    contrast: Range = _r(0.8, 1.1)
    noise: Range = _r(1.0, 5.0)  # sensor noise sigma, grey levels
    blur: Range = _r(0.0, 0.7)  # gaussian blur sigma, output pixels
    occlusion: float = 0.0  # probability that a clip has an occluder (hand, bar) on some frames


class ClipCounts(FrozenConfig):
    """Clips per subject: ``train`` per class (source); ``adapt`` neutral clips, ``oracle`` and
    ``eval`` per class (target)."""

    train: int = Field(default=2, ge=1)
    adapt: int = Field(default=3, ge=1)
    oracle: int = Field(default=2, ge=1)
    eval: int = Field(default=3, ge=1)


class ProfileSpec(FrozenConfig):
    """Everything that defines a profile: classes, sizes and difficulty knobs.

    ``classes[0]`` is the neutral class (the one a person's ``adapt`` videos show); every other
    class needs its entry in ``expressions``. A variant of a built-in profile is
    ``PROFILES["biovid"].model_copy(update={"name": "my_variant", ...})`` passed to
    :func:`register_profile`.
    """

    name: str
    classes: tuple[str, ...]
    source_subjects: int
    target_subjects: int
    neutral: ExpressionSpec
    expressions: dict[str, ExpressionSpec]
    # --- resting face (neutral offset) ---
    resting_lean_fraction: float = 0.33  # share of subjects whose neutral leans to an expression
    resting_lean_strength: Range = _r(0.45, 0.8)
    resting_lean_aus: dict[str, float] = Field(default_factory=dict)
    resting_noise: float = 0.08  # everyone's small random resting offsets (max per action)
    # --- personal expression style ---
    expressiveness: Range = _r(0.5, 1.2)
    elderly_expressiveness: float = 0.75  # multiplier for elderly subjects
    style_jitter: float = 0.35  # lognormal sigma of per-action weights
    au_swap_prob: float = 0.25  # chance a prototype action is swapped for an alternative
    intensity: Range = _r(0.4, 1.0)  # apex intensity of an expressive clip
    # --- the source model ---
    source_epochs: int = Field(default=12, ge=1)
    """Stage-1 epochs of this profile's source model in ``pft simulate`` / ``pft benchmark`` unless
    the experiment sets ``source_train.epochs`` (bah: 20; chosen on validation seeds, docs/cohort.md)."""
    # --- identity mix ---
    age_mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # young, adult, elderly
    glasses_fraction: float = 0.2
    # --- capture and clip counts ---
    capture: CaptureSpec = Field(default_factory=CaptureSpec)
    clips: ClipCounts = Field(default_factory=ClipCounts)
    light_clips: ClipCounts = Field(default_factory=lambda: ClipCounts(train=1, adapt=2, oracle=1, eval=1))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"profile name {value!r}: lower-case letters, digits and '_', a letter first")
        return value

    @model_validator(mode="after")
    def _expressions(self) -> ProfileSpec:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"profile {self.name}: needs a neutral class and at least one other, no repeats")
        missing = [c for c in self.classes[1:] if c not in self.expressions]
        if missing:
            raise ValueError(f"profile {self.name}: no expression spec for class(es) {missing}")
        return self


PROFILES: dict[str, ProfileSpec] = {
    "biovid": ProfileSpec(
        name="biovid",
        classes=("neutral", "pain"),
        source_subjects=77,
        target_subjects=10,
        neutral=ExpressionSpec(blink_rate=0.25, head_motion=1.5),
        expressions={
            # Pain (Prkachin-Solomon): brow lowering, orbit tightening, levator contraction,
            # eye closure.
            "pain": ExpressionSpec(
                aus={"AU4": 0.8, "AU6": 0.5, "AU7": 0.8, "AU9": 0.45, "AU10": 0.45, "AU43": 0.35},
                blink_rate=0.35,
                head_motion=2.5,
            )
        },
        # a resting face that looks like mild pain to someone who does not know the person
        resting_lean_aus={"AU4": 0.6, "AU7": 0.55, "AU6": 0.35, "AU9": 0.3, "AU10": 0.3, "AU15": 0.2},
        resting_lean_fraction=0.45,
        resting_lean_strength=_r(0.6, 1.0),
        intensity=_r(0.4, 1.0),  # PA3..PA4-like spread (the binary BL1 vs PA4 protocol)
        expressiveness=_r(0.45, 1.25),
        elderly_expressiveness=0.75,
        age_mix=(0.3, 0.35, 0.35),  # BioVid spans 18-65 years
        clips=ClipCounts(train=3, adapt=3, oracle=8, eval=3),
    ),
    "stressid": ProfileSpec(
        name="stressid",
        classes=("neutral", "stress"),
        source_subjects=44,
        target_subjects=10,
        neutral=ExpressionSpec(blink_rate=0.25, gaze_aversion=0.1, head_motion=1.5),
        expressions={
            # Stress: pressed lips, brow tension and tightened lids in every frame, on top of
            # the behavioural signs (frequent blinks, gaze aversion, head movement).
            "stress": ExpressionSpec(
                aus={"AU24": 1.0, "AU4": 0.55, "AU7": 0.55, "AU20": 0.3},
                blink_rate=1.1,
                gaze_aversion=0.7,
                head_motion=5.0,
                head_nod=2.0,
            )
        },
        resting_lean_aus={"AU24": 0.6, "AU4": 0.4, "AU7": 0.3},
        intensity=_r(0.55, 1.0),
        age_mix=(0.55, 0.4, 0.05),
        clips=ClipCounts(train=2, adapt=3, oracle=8, eval=3),
    ),
    "bah": ProfileSpec(
        name="bah",
        classes=("neutral", "ambivalence"),
        source_subjects=214,
        target_subjects=10,
        neutral=ExpressionSpec(blink_rate=0.3, head_motion=2.0),
        expressions={
            # Ambivalence/hesitancy: brief, conflicting smile / lip-corner depressor / frown /
            # lip-press bursts that follow one another through the clip, with head shakes.
            "ambivalence": ExpressionSpec(
                aus={"AU12": 0.75, "AU15": 0.75, "AU4": 0.5, "AU24": 0.45},
                dynamics="mixed",
                blink_rate=0.5,
                gaze_aversion=0.5,
                head_shake=7.0,
                head_motion=3.0,
            )
        },
        resting_lean_aus={"AU15": 0.5, "AU4": 0.35, "AU24": 0.35},
        intensity=_r(0.55, 1.0),
        source_epochs=20,  # at 12, F left even the oracle at 82.5 on the validation seeds (cohort.md)
        age_mix=(0.4, 0.45, 0.15),
        capture=CaptureSpec(yaw=10.0, pitch=8.0, light_level=_r(0.65, 1.2), noise=_r(1.5, 6.0)),
        clips=ClipCounts(train=1, adapt=3, oracle=8, eval=3),
    ),
    "affwild2": ProfileSpec(
        name="affwild2",
        classes=("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise"),
        source_subjects=282,
        target_subjects=10,
        neutral=ExpressionSpec(blink_rate=0.3, head_motion=3.0),
        expressions={
            "anger": ExpressionSpec(aus={"AU4": 0.9, "AU5": 0.4, "AU7": 0.6, "AU24": 0.6}, head_motion=4.0),
            "disgust": ExpressionSpec(aus={"AU9": 0.9, "AU10": 0.7, "AU15": 0.4, "AU4": 0.3}),
            "fear": ExpressionSpec(
                aus={"AU1": 0.8, "AU2": 0.6, "AU4": 0.5, "AU5": 0.8, "AU20": 0.7, "AU25": 0.6},
                head_motion=4.0,
            ),
            "happiness": ExpressionSpec(aus={"AU6": 0.8, "AU12": 1.0, "AU25": 0.5}),
            "sadness": ExpressionSpec(aus={"AU1": 0.8, "AU4": 0.5, "AU15": 0.8, "AU43": 0.2}),
            "surprise": ExpressionSpec(aus={"AU1": 0.9, "AU2": 0.9, "AU5": 0.8, "AU26": 0.8, "AU25": 0.6}),
        },
        resting_lean_aus={"AU15": 0.5, "AU4": 0.4, "AU1": 0.3},
        resting_lean_fraction=0.3,
        intensity=_r(0.7, 1.0),
        age_mix=(0.45, 0.4, 0.15),
        glasses_fraction=0.25,
        capture=CaptureSpec(
            yaw=20.0,
            pitch=12.0,
            roll=12.0,
            scale_jitter=0.12,
            shift=0.08,
            light_level=_r(0.55, 1.3),
            light_gradient=_r(0.1, 0.7),
            contrast=_r(0.7, 1.2),
            noise=_r(1.0, 4.0),
            blur=_r(0.0, 0.6),
            occlusion=0.1,
        ),
        clips=ClipCounts(train=1, adapt=3, oracle=8, eval=3),
    ),
}


#: the profiles that ship with the package (the paper's four datasets)
BUILTIN_PROFILES: tuple[str, ...] = tuple(PROFILES)


def register_profile(spec: ProfileSpec, *, replace: bool = False) -> None:
    """Add cohort profile ``spec`` under ``spec.name``: ``pft cohort make``, ``pft simulate
    --profile NAME`` and ``pft benchmark --profiles NAME`` then make its cohort (docs/extending.md).

    A built-in name cannot be taken; another registered name only with ``replace=True``
    (registering an equal spec again does nothing). The cohort cache key holds a registered
    profile's whole spec, so changing a knob makes a new cohort.
    """
    if not isinstance(spec, ProfileSpec):
        raise PluginError(f"a cohort profile must be a ProfileSpec, got {type(spec).__name__}")
    check_name("profile", spec.name)
    if spec.name in BUILTIN_PROFILES:
        raise PluginError(f"profile name {spec.name!r} is taken by the package")
    if spec.name in PROFILES and PROFILES[spec.name] != spec and not replace:
        raise PluginError(f"profile {spec.name!r} is already registered (pass replace=True to replace it)")
    PROFILES[spec.name] = spec


def _register_entry_point(name: str, obj: object) -> None:
    if not isinstance(obj, ProfileSpec):
        raise PluginError(f"a pft.profiles entry point must be a ProfileSpec, got {obj!r}")
    if obj.name != name:
        raise PluginError(f"the entry point is named {name!r} but its profile {obj.name!r}")
    register_profile(obj)


def profile_names() -> tuple[str, ...]:
    """Every profile's name: the built-ins, then the registered ones (entry points read first)."""
    load_entry_points(PROFILES_GROUP, _register_entry_point)
    return tuple(PROFILES)


def known_profile(name: str) -> str:
    """``name`` when it is a built-in or registered profile (a pydantic field validator's body);
    ``ValueError`` naming the choices otherwise. Entry points are read only for a name that is not
    built in, so validating a built-in profile stays cheap."""
    if name in BUILTIN_PROFILES:
        return name
    known = profile_names()
    if name not in known:
        raise ValueError(f"unknown cohort profile {name!r}; choose one of {sorted(known)}")
    return name


def get_profile(name: str) -> ProfileSpec:
    """The profile called ``name`` (one of :func:`profile_names`)."""
    if name not in PROFILES and name not in profile_names():  # entry points read for another name
        raise ValueError(f"unknown cohort profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]
