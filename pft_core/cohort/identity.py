"""Per-subject identity and traits: how a person looks, rests, expresses and is filmed.

A :class:`Subject` is drawn once per subject from its own random stream; it changes every frame
the renderer draws (geometry, colours, age cues, glasses) and how actions map to pixels
(e.g. low brows occlude the lids under brow lowering, glasses glare over tightened eyes, wrinkles
deepen with nose wrinkling), so identity is not an additive shift of anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pft.core.cohort.profiles import AU_ALTERNATIVES, AU_NAMES, ProfileSpec

AgeGroup = Literal["young", "adult", "elderly"]
RGB = tuple[int, int, int]

_SKIN_LIGHT = np.array([238.0, 204.0, 182.0])
_SKIN_DARK = np.array([92.0, 60.0, 44.0])
_HAIR = {
    "black": (28, 24, 22),
    "brown": (92, 60, 38),
    "blond": (196, 160, 96),
    "red": (150, 70, 36),
    "grey": (150, 148, 146),
    "white": (215, 212, 206),
}
_IRIS = [(70, 45, 25), (100, 70, 40), (60, 110, 150), (80, 120, 80), (40, 30, 25), (110, 110, 120)]


def _rgb(values: np.ndarray | tuple[float, float, float]) -> RGB:
    a = np.clip(np.asarray(values, dtype=float), 0, 255)
    return round(float(a[0])), round(float(a[1])), round(float(a[2]))


@dataclass(frozen=True)
class Identity:
    """Fixed appearance of one person, in face units (face half-height = 1, y down)."""

    face_w: float  # face half-width
    jaw_taper: float  # 0 square jaw .. 0.35 pointed chin
    eye_y: float
    eye_dx: float  # eye centre distance from the midline
    eye_w: float  # eye half-width
    eye_h: float  # eye half-height when open
    brow_gap: float  # brow height above the eye centre
    brow_thick: float
    brow_arch: float
    nose_len: float
    nose_w: float
    mouth_gap: float  # nose tip to mouth line
    mouth_w: float  # mouth half-width
    lip_up: float
    lip_low: float
    skin: RGB
    lips: RGB
    iris: RGB
    hair: RGB
    brow_color: RGB
    shirt: RGB
    hair_style: Literal["short", "long", "receding", "fringe"]
    age_group: AgeGroup
    wrinkles: float  # 0..1 age cue strength
    glasses: bool
    glasses_color: RGB
    skin_tone: float  # 0 light .. 1 dark

    @property
    def mouth_y(self) -> float:
        """Mouth line height."""
        return self.eye_y + self.nose_len + self.mouth_gap


@dataclass(frozen=True)
class CaptureBase:
    """A subject's usual capture conditions (per-session jitter is added per clip)."""

    light_dir: float  # radians, direction the light comes from
    light_level: float
    light_gradient: float
    contrast: float
    noise: float
    blur: float
    yaw: float
    pitch: float
    roll: float
    background: RGB
    background_alt: RGB


@dataclass(frozen=True)
class Subject:
    """One subject: identity plus the ground-truth traits that drive personalisation."""

    index: int
    subject_id: str
    role: Literal["source", "target"]
    identity: Identity
    resting_aus: dict[str, float]
    resting_leans: bool
    resting_strength: float
    expressiveness: float
    style: dict[str, dict[str, float]]  # class -> action -> weight at apex
    capture: CaptureBase
    traits: dict[str, float | str | bool] = field(default_factory=dict)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_identity(rng: np.random.Generator, profile: ProfileSpec) -> Identity:
    """Draw one person's appearance."""
    age_group: AgeGroup = ("young", "adult", "elderly")[int(rng.choice(3, p=np.array(profile.age_mix)))]
    wrinkles = {
        "young": _uniform(rng, 0.0, 0.12),
        "adult": _uniform(rng, 0.15, 0.45),
        "elderly": _uniform(rng, 0.6, 1.0),
    }[age_group]
    tone = float(rng.beta(1.6, 1.8))
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone
    skin = skin * rng.uniform(0.95, 1.05, size=3)
    lips = skin * 0.45 + np.array([185.0, 62.0, 72.0]) * 0.55 * (1.0 - 0.45 * tone)
    if age_group == "elderly":
        hair_name = str(rng.choice(["grey", "white", "grey", "brown"]))
    else:
        hair_name = str(rng.choice(["black", "brown", "blond", "red", "black", "brown"]))
    hair = np.array(_HAIR[hair_name], dtype=float) * rng.uniform(0.85, 1.15)
    style = str(rng.choice(["short", "long", "receding", "fringe"], p=[0.35, 0.3, 0.15, 0.2]))
    if age_group == "young" and style == "receding":
        style = "short"
    brow = hair * 0.6 if hair_name not in ("white", "grey", "blond") else hair * 0.55 + 20
    return Identity(
        face_w=_uniform(rng, 0.70, 0.84),
        jaw_taper=_uniform(rng, 0.0, 0.35),
        eye_y=_uniform(rng, -0.09, -0.01),
        eye_dx=_uniform(rng, 0.3, 0.37),
        eye_w=_uniform(rng, 0.145, 0.18),
        eye_h=_uniform(rng, 0.068, 0.092),
        brow_gap=_uniform(rng, 0.12, 0.21),
        brow_thick=_uniform(rng, 0.035, 0.065),
        brow_arch=_uniform(rng, 0.0, 0.05),
        nose_len=_uniform(rng, 0.34, 0.45),
        nose_w=_uniform(rng, 0.085, 0.135),
        mouth_gap=_uniform(rng, 0.16, 0.22),
        mouth_w=_uniform(rng, 0.27, 0.34),
        lip_up=_uniform(rng, 0.055, 0.08),
        lip_low=_uniform(rng, 0.065, 0.1),
        skin=_rgb(skin),
        lips=_rgb(lips),
        iris=_IRIS[int(rng.integers(len(_IRIS)))],
        hair=_rgb(hair),
        brow_color=_rgb(brow),
        shirt=_rgb(rng.uniform(30, 220, size=3)),
        hair_style=style,  # type: ignore[arg-type]
        age_group=age_group,
        wrinkles=wrinkles,
        glasses=bool(rng.random() < profile.glasses_fraction),
        glasses_color=_rgb(rng.choice([20.0, 60.0, 120.0, 160.0]) * np.array([1.0, 0.9, 0.8])),
        skin_tone=tone,
    )


def _personal_style(rng: np.random.Generator, profile: ProfileSpec) -> dict[str, dict[str, float]]:
    """Per-class action weights: the prototype, jittered, with some actions swapped."""
    style: dict[str, dict[str, float]] = {}
    for name in profile.classes[1:]:
        weights: dict[str, float] = {}
        for au, w in profile.expressions[name].aus.items():
            target = au
            if rng.random() < profile.au_swap_prob:
                target = str(rng.choice(AU_ALTERNATIVES[au]))
            jitter = float(np.exp(rng.normal(0.0, profile.style_jitter)))
            weights[target] = min(1.2, weights.get(target, 0.0) + w * jitter)
        style[name] = weights
    return style


def sample_subject(
    rng: np.random.Generator,
    profile: ProfileSpec,
    index: int,
    role: Literal["source", "target"],
    id_width: int = 3,
) -> Subject:
    """Draw one subject: identity, resting face, expression style and capture conditions."""
    identity = sample_identity(rng, profile)
    # (a) resting face: everyone has small offsets; some lean toward an expressive class
    resting = {au: float(rng.uniform(0.0, profile.resting_noise)) for au in AU_NAMES if au != "AU43"}
    resting["AU12"] = float(rng.uniform(0.0, 2 * profile.resting_noise))  # some rest smiling
    leans = bool(rng.random() < profile.resting_lean_fraction)
    strength = 0.0
    if leans:
        strength = _uniform(rng, profile.resting_lean_strength.lo, profile.resting_lean_strength.hi)
        for au, w in profile.resting_lean_aus.items():
            resting[au] = min(1.0, resting.get(au, 0.0) + strength * w * float(rng.uniform(0.6, 1.3)))
        resting["AU12"] = 0.0
    # (b) personal expression style and expressiveness
    expressiveness = _uniform(rng, profile.expressiveness.lo, profile.expressiveness.hi)
    if identity.age_group == "elderly":
        expressiveness *= profile.elderly_expressiveness
    style = _personal_style(rng, profile)
    # (c) capture conditions
    cap = profile.capture
    bg = rng.uniform(50, 210) + rng.normal(0.0, 22.0, size=3)
    capture = CaptureBase(
        light_dir=_uniform(rng, 0.0, 2 * np.pi),
        light_level=_uniform(rng, cap.light_level.lo, cap.light_level.hi),
        light_gradient=_uniform(rng, cap.light_gradient.lo, cap.light_gradient.hi),
        contrast=_uniform(rng, cap.contrast.lo, cap.contrast.hi),
        noise=_uniform(rng, cap.noise.lo, cap.noise.hi),
        blur=_uniform(rng, cap.blur.lo, cap.blur.hi),
        yaw=_uniform(rng, -cap.yaw, cap.yaw),
        pitch=_uniform(rng, -cap.pitch, cap.pitch),
        roll=_uniform(rng, -cap.roll, cap.roll),
        background=_rgb(bg),
        background_alt=_rgb(bg * rng.uniform(0.6, 1.3, size=3)),
    )
    subject_id = f"S{index + 1:0{id_width}d}"
    traits: dict[str, float | str | bool] = {
        "age_group": identity.age_group,
        "wrinkles": round(identity.wrinkles, 3),
        "glasses": identity.glasses,
        "hair_style": identity.hair_style,
        "skin_tone": round(identity.skin_tone, 3),
        "brow_gap": round(identity.brow_gap, 3),
        # capture conditions (the subject's base; clips jitter around it)
        "capture_light": round(capture.light_level, 3),
        "capture_contrast": round(capture.contrast, 3),
        "capture_noise": round(capture.noise, 3),
        "capture_blur": round(capture.blur, 3),
        "capture_yaw": round(capture.yaw, 2),
    }
    return Subject(
        index=index,
        subject_id=subject_id,
        role=role,
        identity=identity,
        resting_aus={k: round(v, 4) for k, v in resting.items()},
        resting_leans=leans,
        resting_strength=strength,
        expressiveness=expressiveness,
        style=style,
        capture=capture,
        traits=traits,
    )
