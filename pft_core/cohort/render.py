"""Draw one face frame from identity, facial actions, head pose and capture conditions.

Faces are drawn with OpenCV polygons (anti-aliased, sub-pixel) at twice the output size and
reduced with area averaging. Every point lives on a pseudo-3D head (x right, y down, z toward the
camera; face half-height = 1) and is projected after yaw, pitch and roll, so pose moves features
relative to the outline. The renderer returns the 68 iBUG 300-W landmarks and the face box it drew:
the ground truth the sidecar files carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from pft.core.cohort.identity import RGB, Identity

SUPERSAMPLE = 2
_SHIFT = 4
_ONE = float(1 << _SHIFT)
_HEAD_DEPTH = 0.6


@dataclass(frozen=True)
class Occluder:
    """Something in front of the face (a hand or a bar), in face units relative to the face centre."""

    kind: Literal["hand", "bar"]
    x: float
    y: float
    size: float
    angle: float  # radians
    color: RGB


@dataclass(frozen=True)
class FrameState:
    """What changes from frame to frame: actions, pose, gaze, placement and occlusion."""

    aus: dict[str, float]
    yaw: float  # degrees
    pitch: float
    roll: float
    gaze: tuple[float, float]  # -1..1 (x right, y down)
    center: tuple[float, float]  # face centre, fraction of the frame
    scale: float  # face half-height, fraction of the frame
    occluder: Occluder | None = None


@dataclass(frozen=True)
class SessionLook:
    """Capture conditions of one clip (session)."""

    background: np.ndarray  # (S*SUPERSAMPLE, S*SUPERSAMPLE, 3) uint8
    light: np.ndarray  # (S, S) float32 multiplicative light field
    contrast: float
    noise: float
    blur: float
    glare: float  # glasses glare opacity
    light_dir: float


@dataclass(frozen=True)
class RenderedFrame:
    """A rendered RGB frame with its ground truth in output pixel coordinates."""

    image: np.ndarray  # (S, S, 3) uint8 RGB
    landmarks: np.ndarray  # (68, 2) float
    box: np.ndarray  # (4,) x0, y0, x1, y1


def _shade(color: RGB, k: float) -> RGB:
    return (
        int(min(255, max(0, color[0] * k))),
        int(min(255, max(0, color[1] * k))),
        int(min(255, max(0, color[2] * k))),
    )


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        int(a[0] * (1 - t) + b[0] * t),
        int(a[1] * (1 - t) + b[1] * t),
        int(a[2] * (1 - t) + b[2] * t),
    )


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * _ONE).astype(np.int32)


def _fill(img: np.ndarray, pts: np.ndarray, color: RGB) -> None:
    cv2.fillPoly(img, [_fixed(pts)], color, cv2.LINE_AA, _SHIFT)


def _line(img: np.ndarray, pts: np.ndarray, color: RGB, thickness: float, closed: bool = False) -> None:
    cv2.polylines(img, [_fixed(pts)], closed, color, max(1, round(thickness)), cv2.LINE_AA, _SHIFT)


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, n: int = 20, rot: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=-1)


class _Projector:
    """Projects face-unit points (x, y[, z]) to supersampled pixel coordinates."""

    def __init__(self, identity: Identity, state: FrameState, size: int) -> None:
        self.a = identity.face_w
        yaw, pitch, roll = np.radians([state.yaw, state.pitch, state.roll])
        self.cy_, self.sy_ = np.cos(yaw), np.sin(yaw)
        self.cp, self.sp = np.cos(pitch), np.sin(pitch)
        self.cr, self.sr = np.cos(roll), np.sin(roll)
        ss = size * SUPERSAMPLE
        self.ox, self.oy = state.center[0] * ss, state.center[1] * ss
        self.k = state.scale * ss

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth of the face surface at (x, y)."""
        r = np.clip(1.0 - (x / (self.a * 1.08)) ** 2, 0.02, 1.0)
        return _HEAD_DEPTH * np.sqrt(r) * (1.0 - 0.3 * np.clip(y - 0.5, 0.0, 1.0))

    def __call__(self, xy: np.ndarray, z: np.ndarray | float | None = None, dz: float = 0.0) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        x, y = xy[:, 0], xy[:, 1]
        zz = self.depth(x, y) if z is None else np.broadcast_to(np.asarray(z, dtype=np.float64), x.shape)
        zz = zz + dz
        x1 = x * self.cy_ + zz * self.sy_
        z1 = -x * self.sy_ + zz * self.cy_
        y1 = y * self.cp + z1 * self.sp
        x2 = x1 * self.cr - y1 * self.sr
        y2 = x1 * self.sr + y1 * self.cr
        return np.stack([self.ox + self.k * x2, self.oy + self.k * y2], axis=-1)


def render_frame(
    identity: Identity,
    state: FrameState,
    look: SessionLook,
    size: int,
    rng: np.random.Generator,
) -> RenderedFrame:
    """Render one RGB frame of ``size`` x ``size`` pixels.

    Parameters
    ----------
    identity:
        The person's fixed appearance.
    state:
        Facial actions (0..1 each), head pose, gaze, placement and occluder of this frame.
    look:
        The clip's capture conditions (background, light, contrast, noise, blur).
    size:
        Output width and height in pixels.
    rng:
        Source of the frame's sensor noise.

    Returns
    -------
    RenderedFrame
        The image and the 68 landmarks and face box, in output pixel coordinates.
    """
    au = state.aus

    def A(name: str) -> float:
        return float(au.get(name, 0.0))

    idt = identity
    P = _Projector(idt, state, size)
    img = look.background.copy()
    k = P.k
    t1 = max(1.0, k * 0.016)  # fine line thickness (supersampled px)
    a = idt.face_w
    skin = idt.skin
    wr = idt.wrinkles
    au43 = A("AU43")

    # --- hair behind the head, neck and shoulders ----------------------------------------------
    if idt.hair_style == "long":
        th = np.linspace(np.pi * 1.08, -np.pi * 0.08, 17)
        back = np.stack([(a + 0.17) * np.cos(th), -0.05 - 1.12 * np.sin(th)], -1)
        back = np.vstack([back, [[a + 0.16, 1.25], [-a - 0.16, 1.25]]])
        _fill(img, P(back, z=-0.3), idt.hair)
    neck = np.array([[-0.33 * a, 0.6], [0.33 * a, 0.6], [0.4 * a, 1.6], [-0.4 * a, 1.6]])
    _fill(img, P(neck, z=-0.25), _shade(skin, 0.82))
    shoulders = np.array([[-1.8, 2.4], [-1.55, 1.5], [-0.45, 1.28], [0.45, 1.28], [1.55, 1.5], [1.8, 2.4]])
    _fill(img, P(shoulders, z=-0.3), idt.shirt)
    for s in (-1.0, 1.0):
        ear = _ellipse_pts(s * (a - 0.01), idt.eye_y + 0.13, 0.075, 0.15, 14)
        _fill(img, P(ear, z=-0.05), _shade(skin, 0.9))

    # --- face outline: jaw (landmarks 0-16) and forehead ---------------------------------------
    phi = np.linspace(0.0, np.pi, 17)
    sphi = np.sin(phi)
    y0 = idt.eye_y + 0.02
    chin = 1.0 + 0.15 * A("AU26")
    jaw = np.stack([-a * np.cos(phi) * (1.0 - idt.jaw_taper * sphi**2), y0 + (chin - y0) * sphi**1.15], -1)
    psi = np.linspace(0.0, np.pi, 15)[1:-1]
    forehead = np.stack([a * 0.985 * np.cos(psi), y0 - (1.0 + y0) * np.sin(psi) ** 0.9], -1)
    outline = np.vstack([jaw, forehead])
    outline_px = P(outline, z=0.12)
    _fill(img, outline_px, skin)
    jaw_px = outline_px[:17]

    # --- cheeks (AU6 raises them, AU12 pushes them up) -------------------------------------------
    cheek_lift = 0.07 * A("AU6") + 0.03 * A("AU12")
    cheek_col = _mix(skin, (215, 120, 115), 0.12 + 0.1 * A("AU6"))
    for s in (-1.0, 1.0):
        cheek = _ellipse_pts(s * (idt.eye_dx + 0.03), idt.eye_y + 0.3 - cheek_lift, 0.1, 0.07, 14)
        _fill(img, P(cheek), cheek_col)

    # --- eyes (landmarks 36-47) ------------------------------------------------------------------
    eye_lm: list[np.ndarray] = []
    upper_h = idt.eye_h * (1 + 0.6 * A("AU5") - 0.5 * A("AU7") - 0.2 * A("AU6") - 0.2 * A("AU4"))
    upper_h = max(0.0, upper_h) * (1.0 - au43)
    lower_h = idt.eye_h * 0.72 * max(0.0, 1 - 0.85 * A("AU7") - 0.45 * A("AU6") + 0.15 * A("AU5"))
    lower_h *= 1.0 - 0.7 * au43
    ri = min(idt.eye_h * 0.95, idt.eye_w * 0.55)
    u = np.linspace(-1.0, 1.0, 13)
    sel_up, sel_low = [0, 4, 8, 12], [8, 4]
    for s in (-1.0, 1.0):
        cx, cy = s * idt.eye_dx, idt.eye_y
        xs = cx + idt.eye_w * u
        bow = 1 - u**2
        up = np.stack([xs, cy - upper_h * bow * (1 + 0.18 * (-s * u)) - 0.002], -1)
        low = np.stack([xs, cy + lower_h * bow + 0.002], -1)
        _fill(img, P(np.vstack([up, low[::-1]])), (228, 224, 218))
        gx, gy = state.gaze
        ix, iy = cx + gx * idt.eye_w * 0.42, cy + gy * idt.eye_h * 0.3
        _fill(img, P(_ellipse_pts(ix, iy, ri, ri, 16)), idt.iris)
        _fill(img, P(_ellipse_pts(ix, iy, ri * 0.45, ri * 0.45, 12)), (12, 10, 10))
        hl = _ellipse_pts(ix + 0.3 * ri * np.cos(look.light_dir), iy - 0.3 * ri, ri * 0.18, ri * 0.18, 8)
        _fill(img, P(hl), (245, 245, 245))
        xl, xr = cx - idt.eye_w - 0.05, cx + idt.eye_w + 0.05
        top = cy - 2.4 * idt.eye_h
        bot = cy + 2.3 * idt.eye_h
        cover_up = np.vstack([[[xl, cy]], up, [[xr, cy], [xr, top], [xl, top]]])
        cover_low = np.vstack([[[xl, cy]], low, [[xr, cy], [xr, bot], [xl, bot]]])
        _fill(img, P(cover_up), skin)
        _fill(img, P(cover_low), skin)
        lash = _shade(idt.brow_color, 0.55)
        _line(img, P(up), lash, max(1.5, k * 0.028))
        _line(img, P(low[2:-2]), _shade(skin, 0.72), t1)
        crease = np.stack([xs[2:-2], up[2:-2, 1] - (0.3 * idt.eye_h + 0.015) * bow[2:-2] - 0.01], -1)
        _line(img, P(crease), _shade(skin, 0.8), t1)
        # eye bags (age) and the infraorbital furrow of a cheek raise
        bag = wr * 0.8 + 0.9 * A("AU6")
        if bag > 0.12:
            furrow = np.stack([xs[2:-2], low[2:-2, 1] + 0.045 + 0.02 * bow[2:-2] - 0.02 * A("AU6")], -1)
            _line(img, P(furrow), _shade(skin, 1 - 0.28 * min(bag, 1.2)), t1)
        # crow's feet: age, deepened by cheek raise and lid tightening
        crow = wr * (0.3 + A("AU6") + 0.6 * A("AU7")) + 0.3 * A("AU6")
        if crow > 0.12:
            ox = s * (idt.eye_dx + idt.eye_w + 0.025)
            for j in (-1.0, 0.0, 1.0):
                seg = np.array([[ox, cy + j * 0.02], [ox + s * 0.065, cy + j * 0.045]])
                _line(img, P(seg), _shade(skin, 1 - 0.3 * min(crow, 1.2)), t1)
        eye_pts = np.vstack([up[sel_up[:3]], [up[12]], low[sel_low]])
        eye_lm.append(P(eye_pts))

    # --- wrinkles: forehead, glabella ----------------------------------------------------------
    brow_base = idt.eye_y - idt.brow_gap
    fh = 0.5 * wr + max(A("AU1"), A("AU2")) * (0.5 + wr)
    if fh > 0.12:
        for j in range(3):
            yy = brow_base - 0.09 - 0.065 * j
            xx = np.linspace(-0.3 + 0.04 * j, 0.3 - 0.04 * j, 7)
            line = np.stack([xx, yy + 0.04 * (xx / 0.3) ** 2], -1)
            _line(img, P(line), _shade(skin, 1 - 0.3 * min(fh, 1.2)), t1)
    glab = A("AU4") * (0.6 + 0.8 * wr)
    if glab > 0.1:
        for s in (-1.0, 1.0):
            seg = np.array([[s * 0.035, brow_base - 0.03], [s * 0.028, brow_base + 0.07]])
            _line(img, P(seg), _shade(skin, 1 - 0.4 * min(glab, 1.2)), t1)

    # --- brows (landmarks 17-26) ---------------------------------------------------------------
    brow_lm: list[np.ndarray] = []
    tb = np.linspace(0.0, 1.0, 9)  # 0 = inner end, 1 = outer end
    for s in (-1.0, 1.0):
        xi, xo = 0.09 - 0.045 * A("AU4"), idt.eye_dx + idt.eye_w + 0.05
        xs = s * (xi + tb * (xo - xi))
        ys = (
            brow_base
            - idt.brow_arch * 4 * tb * (1 - tb)
            - 0.11 * A("AU1") * (1 - tb) ** 1.5
            - 0.1 * A("AU2") * tb**1.5
            + 0.095 * A("AU4")
            + 0.03 * A("AU4") * (1 - tb)
            + 0.015 * A("AU9") * (1 - tb)
            + 0.02 * A("AU43") * (1 - tb)
        )
        th = idt.brow_thick * (1.0 - 0.45 * tb)
        poly = np.vstack([np.stack([xs, ys - th / 2], -1), np.stack([xs, ys + th / 2], -1)[::-1]])
        _fill(img, P(poly), idt.brow_color)
        centre = np.stack([xs, ys], -1)[[0, 2, 4, 6, 8]]
        brow_lm.append(P(centre[::-1] if s < 0 else centre))

    # --- nose (landmarks 27-35) -----------------------------------------------------------------
    tip_y = idt.eye_y + idt.nose_len
    lift = 0.03 * A("AU9") + 0.015 * A("AU10")
    nw = idt.nose_w * (1 + 0.18 * A("AU9") + 0.08 * A("AU10"))
    side_col = _shade(skin, 0.76)
    for s in (-1.0, 1.0):
        side = np.array(
            [
                [s * 0.045, idt.eye_y + 0.07],
                [s * 0.055, tip_y - 0.12],
                [s * (nw + 0.012), tip_y - 0.01 - lift],
                [s * nw * 0.85, tip_y + 0.045 - lift],
            ]
        )
        _line(img, P(side, dz=0.08), side_col, t1)
        nostril = _ellipse_pts(s * nw * 0.5, tip_y + 0.035 - lift, nw * 0.3, 0.016 * (1 + 0.6 * A("AU9")), 12)
        _fill(img, P(nostril, dz=0.08), _shade(skin, 0.42))
    _fill(img, P(_ellipse_pts(0.0, tip_y - 0.025, 0.04, 0.025, 10), dz=0.22), _shade(skin, 1.07))
    nose_wr = A("AU9") * (0.7 + 0.6 * wr)
    if nose_wr > 0.1:
        for j in range(3):
            yy = idt.eye_y + 0.05 + 0.035 * j
            seg = np.array([[-0.06, yy + 0.01], [0.0, yy], [0.06, yy + 0.01]])
            _line(img, P(seg, dz=0.05), _shade(skin, 1 - 0.4 * min(nose_wr, 1.2)), t1)
    bridge = np.array([[0.0, idt.eye_y + f * idt.nose_len] for f in (0.0, 1 / 3, 2 / 3, 1.0)])
    bridge_px = np.vstack([P(bridge[i : i + 1], dz=d) for i, d in enumerate((0.03, 0.1, 0.17, 0.25))])
    base_x = np.array([-nw, -nw / 2, 0.0, nw / 2, nw])
    base_y = tip_y + 0.055 - lift - np.array([0.0, 0.01, 0.018, 0.01, 0.0])
    base_px = P(np.stack([base_x, base_y], -1), dz=0.1)

    # --- mouth (landmarks 48-67) and folds -------------------------------------------------------
    mw = idt.mouth_w * (
        1 + 0.2 * A("AU12") + 0.25 * A("AU20") - 0.2 * A("AU24") + 0.05 * A("AU26") - 0.06 * A("AU15")
    )
    corner_dy = -0.09 * A("AU12") + 0.09 * A("AU15") - 0.012 * A("AU20") - 0.01 * A("AU10")
    my = idt.mouth_y + 0.02 * A("AU26")
    up_th = max(0.006, idt.lip_up * (1 - 0.85 * A("AU24") - 0.3 * A("AU20") - 0.2 * A("AU12")))
    low_th = max(0.007, idt.lip_low * (1 - 0.8 * A("AU24") - 0.3 * A("AU20") - 0.15 * A("AU12")))
    gap = max(0.0, 0.045 * A("AU25") + 0.2 * A("AU26") + 0.02 * A("AU10") - 0.04 * A("AU24"))
    raise10 = 0.045 * A("AU10") + 0.015 * A("AU9")
    t = np.linspace(-1.0, 1.0, 13)
    xs = t * mw
    base = my + corner_dy * t**2
    bow = np.clip(1 - t**2, 0.0, 1.0)
    inner_up = base - (gap * 0.3 + raise10) * bow**0.8
    inner_low = base + gap * 0.7 * bow**0.8 + 0.02 * A("AU26") * bow
    outer_up = inner_up - up_th * bow**0.5 * (1 - 0.25 * np.exp(-((t / 0.15) ** 2)))
    outer_low = inner_low + low_th * bow**0.5
    # nasolabial folds and marionette lines
    nl = 0.1 + 0.5 * wr + 0.7 * A("AU10") + 0.6 * A("AU12") + 0.4 * A("AU9") + 0.3 * A("AU6")
    for s in (-1.0, 1.0):
        fold = np.array(
            [
                [s * (nw + 0.035), tip_y - 0.005 - lift],
                [s * (mw + 0.06), 0.5 * (tip_y + my) + 0.02],
                [s * (mw + 0.045), my + corner_dy + 0.06],
            ]
        )
        _line(img, P(fold), _shade(skin, 1 - 0.3 * min(nl, 1.2)), t1)
        mar = 0.6 * wr + 0.7 * A("AU15")
        if mar > 0.15:
            seg = np.array([[s * (mw + 0.015), my + corner_dy + 0.03], [s * (mw + 0.01), my + 0.2]])
            _line(img, P(seg), _shade(skin, 1 - 0.3 * min(mar, 1.2)), t1)
    if A("AU24") > 0.15:  # pressed lips push the chin up: a mentalis crease under the lower lip
        chin_line = np.stack([xs[2:-2], outer_low[2:-2] + 0.035], -1)
        _line(img, P(chin_line), _shade(skin, 1 - 0.45 * min(A("AU24"), 1.0)), 1.5 * t1)
    up_poly = np.stack([xs, outer_up], -1)
    low_poly = np.stack([xs, outer_low], -1)
    lip_col = _mix(idt.lips, skin, 0.45 * A("AU24"))  # pressed lips blanch
    _fill(img, P(np.vstack([up_poly, low_poly[::-1]])), lip_col)
    in_up = np.stack([xs, inner_up], -1)
    in_low = np.stack([xs, inner_low], -1)
    if gap > 0.004 or raise10 > 0.01:
        _fill(img, P(np.vstack([in_up, in_low[::-1]])), (58, 22, 26))
        tooth = min(0.45 * (inner_low - inner_up).max(), 0.035)
        teeth = np.vstack([in_up[2:-2], (in_up[2:-2] + np.array([0.0, tooth]))[::-1]])
        _fill(img, P(teeth), (232, 226, 212))
    _line(img, P(in_up), _shade(idt.lips, 0.6), t1)
    mouth_lm = np.vstack(
        [
            P(up_poly[[0, 2, 4, 6, 8, 10, 12]]),
            P(low_poly[[10, 8, 6, 4, 2]]),
            P(in_up[[0, 3, 6, 9, 12]]),
            P(in_low[[9, 6, 3]]),
        ]
    )

    # --- hair in front ----------------------------------------------------------------------------
    if idt.hair_style != "receding" or wr < 0.95:
        hairline = {
            "short": -0.72,
            "long": -0.68,
            "receding": -0.9,
            "fringe": brow_base - 0.11,
        }[idt.hair_style]
        temple = idt.eye_y - (0.3 if idt.hair_style == "receding" else 0.08)
        th = np.linspace(np.pi, 0.0, 17)
        outer = np.stack([(a + 0.05) * np.cos(th), temple - (1.09 + temple) * np.sin(th)], -1)
        xx = np.linspace(a * 0.99, -a * 0.99, 15)
        expo = 2.0 if idt.hair_style == "receding" else 4.0
        inner = np.stack([xx, hairline + (temple - hairline) * (np.abs(xx) / a) ** expo], -1)
        _fill(img, np.vstack([P(outer, z=0.12), P(inner)]), idt.hair)
        if idt.hair_style == "long":
            for s in (-1.0, 1.0):
                lock = np.array(
                    [
                        [s * (a + 0.06), temple],
                        [s * (a + 0.14), 0.95],
                        [s * (a - 0.01), 0.85],
                        [s * (a - 0.06), 0.05],
                    ]
                )
                _fill(img, P(lock, z=0.1), idt.hair)

    # --- glasses: frame, tint and glare over the eyes ------------------------------------------
    if idt.glasses:
        overlay = img.copy()
        lenses = []
        for s in (-1.0, 1.0):
            lens = _ellipse_pts(s * idt.eye_dx, idt.eye_y + 0.01, idt.eye_w + 0.065, idt.eye_h + 0.075, 20)
            lenses.append(P(lens, dz=0.06))
            _fill(overlay, lenses[-1], (200, 210, 220))
            glare = _ellipse_pts(
                s * idt.eye_dx + 0.05 * np.cos(look.light_dir),
                idt.eye_y - 0.02 * np.sin(look.light_dir),
                idt.eye_w * 0.8,
                idt.eye_h * 0.7,
                12,
                rot=look.light_dir,
            )
            _fill(overlay, P(glare, dz=0.07), (250, 250, 250))
        alpha = 0.15 + look.glare
        cv2.addWeighted(overlay, alpha, img, 1 - alpha, 0.0, dst=img)
        fw = max(1.5, k * 0.02)
        for s, lens in zip((-1.0, 1.0), lenses, strict=True):
            _line(img, lens, idt.glasses_color, fw, closed=True)
            temple_arm = np.array(
                [[s * (idt.eye_dx + idt.eye_w + 0.065), idt.eye_y], [s * a, idt.eye_y - 0.02]]
            )
            _line(img, P(temple_arm, dz=0.03), idt.glasses_color, fw)
        inner_x = idt.eye_dx - idt.eye_w - 0.065
        bridge_arm = np.array(
            [[-inner_x, idt.eye_y - 0.01], [0.0, idt.eye_y - 0.03], [inner_x, idt.eye_y - 0.01]]
        )
        _line(img, P(bridge_arm, dz=0.1), idt.glasses_color, fw)

    # --- occluder ------------------------------------------------------------------------------
    occ = state.occluder
    if occ is not None:
        cxp, cyp = P.ox + P.k * occ.x, P.oy + P.k * occ.y
        r = P.k * occ.size
        if occ.kind == "hand":
            palm = _ellipse_pts(cxp, cyp, 0.32 * r, 0.4 * r, 16, rot=occ.angle)
            cv2.fillPoly(img, [_fixed(palm)], occ.color, cv2.LINE_AA, _SHIFT)
            for j in range(4):
                fx = cxp + (j - 1.5) * 0.17 * r
                finger = _ellipse_pts(fx, cyp - 0.55 * r, 0.075 * r, 0.28 * r, 10)
                cv2.fillPoly(img, [_fixed(finger)], _shade(occ.color, 0.95), cv2.LINE_AA, _SHIFT)
        else:
            c, s_ = np.cos(occ.angle), np.sin(occ.angle)
            half = np.array([[-1.0, -0.12], [1.0, -0.12], [1.0, 0.12], [-1.0, 0.12]]) * r
            bar = np.stack(
                [cxp + half[:, 0] * c - half[:, 1] * s_, cyp + half[:, 0] * s_ + half[:, 1] * c], -1
            )
            cv2.fillPoly(img, [_fixed(bar)], occ.color, cv2.LINE_AA, _SHIFT)

    # --- capture: downscale, light, contrast, blur, noise ------------------------------------
    small: np.ndarray = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    small *= look.light[..., None]
    small = (small - 128.0) * look.contrast + 128.0
    if look.blur > 0.3:
        small = cv2.GaussianBlur(small, (0, 0), look.blur)
    if look.noise > 0.0:
        small += rng.normal(0.0, look.noise, size=small.shape).astype(np.float32)
    image = np.clip(small + 0.5, 0, 255).astype(np.uint8)

    landmarks_ss = np.vstack(
        [jaw_px, brow_lm[0], brow_lm[1], bridge_px, base_px, eye_lm[0], eye_lm[1], mouth_lm]
    )

    def to_out(p: np.ndarray) -> np.ndarray:
        return (p + 0.5) / SUPERSAMPLE - 0.5

    landmarks = to_out(landmarks_ss)
    face = to_out(outline_px)
    box = np.array([face[:, 0].min(), face[:, 1].min(), face[:, 0].max(), face[:, 1].max()])
    return RenderedFrame(image=image, landmarks=landmarks, box=box)


def make_session_look(
    rng: np.random.Generator,
    size: int,
    background: RGB,
    background_alt: RGB,
    light_dir: float,
    light_level: float,
    light_gradient: float,
    contrast: float,
    noise: float,
    blur: float,
    glare: float,
) -> SessionLook:
    """Build one clip's capture conditions: a textured background and a directional light field."""
    ss = size * SUPERSAMPLE
    coarse = rng.uniform(0.0, 1.0, size=(5, 5)).astype(np.float32)
    tex = cv2.resize(coarse, (ss, ss), interpolation=cv2.INTER_CUBIC)
    tex = np.clip(tex, 0.0, 1.0)[..., None]
    bg = np.asarray(background, np.float32) * (1 - tex) + np.asarray(background_alt, np.float32) * tex
    pattern: Callable[[np.ndarray], np.ndarray] | None = None
    choice = rng.random()
    if choice < 0.3:
        period = rng.uniform(0.08, 0.25) * ss

        def pattern(x: np.ndarray) -> np.ndarray:
            return 0.9 + 0.1 * np.sign(np.sin(2 * np.pi * x / period))

    if pattern is not None:
        xs = np.arange(ss, dtype=np.float32)
        bg *= pattern(xs)[None, :, None]
    bg = bg + rng.normal(0.0, 4.0, size=bg.shape)
    background_img = np.clip(bg, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    light = light_level * (1.0 + 2.0 * light_gradient * (xx * np.cos(light_dir) + yy * np.sin(light_dir)))
    return SessionLook(
        background=background_img,
        light=np.asarray(np.clip(light, 0.2, 2.0), dtype=np.float32),
        contrast=contrast,
        noise=noise,
        blur=blur,
        glare=glare,
        light_dir=light_dir,
    )
