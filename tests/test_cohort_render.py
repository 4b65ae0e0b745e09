"""The renderer: every action changes pixels where it should; identities differ."""

from __future__ import annotations

import numpy as np
import pytest

from pft.core.cohort import AU_NAMES, CohortConfig
from pft.core.cohort.generate import make_subject
from pft.core.cohort.render import FrameState, SessionLook, render_frame

SIZE = 96
CONFIG = CohortConfig(source_subjects=8, target_subjects=2)


def _look() -> SessionLook:
    return SessionLook(
        background=np.full((2 * SIZE, 2 * SIZE, 3), 120, np.uint8),
        light=np.ones((SIZE, SIZE), np.float32),
        contrast=1.0,
        noise=0.0,
        blur=0.0,
        glare=0.0,
        light_dir=0.0,
    )


def _state(aus: dict[str, float]) -> FrameState:
    return FrameState(aus=aus, yaw=0.0, pitch=0.0, roll=0.0, gaze=(0.0, 0.0), center=(0.5, 0.47), scale=0.31)


def _render(index: int, aus: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    subject = make_subject(CONFIG, index)
    out = render_frame(subject.identity, _state(aus), _look(), SIZE, np.random.default_rng(0))
    return out.image.astype(float), out.landmarks


@pytest.mark.parametrize("au", AU_NAMES)
def test_every_action_changes_the_pixels(au: str) -> None:
    rest, _ = _render(0, {})
    moved, _ = _render(0, {au: 1.0})
    changed = (np.abs(moved - rest).max(axis=-1) > 12).sum()
    assert changed >= 4, f"{au} changed only {changed} pixels"


def _band_change(index: int, aus: dict[str, float]) -> tuple[float, float]:
    rest, lm = _render(index, {})
    moved, _ = _render(index, aus)
    diff = np.abs(moved - rest).mean(axis=-1)
    top = int(lm[17:27, 1].min()) - 3
    mid = int(lm[36:48, 1].max()) + 3
    upper = diff[top:mid].mean()
    lower = diff[int(lm[48:68, 1].max()) + 2 :].mean()
    return upper, lower


def test_pain_apex_changes_the_brow_eye_band_more_than_elsewhere() -> None:
    for index in range(3):
        subject = make_subject(CONFIG, index)
        pain = {au: min(1.0, w) for au, w in subject.style["pain"].items()}
        pain.pop("AU10", None), pain.pop("AU9", None)
        upper, lower = _band_change(index, pain or {"AU4": 1.0})
        assert upper > 3 * lower


def test_lip_corner_pull_changes_the_mouth_not_the_brows() -> None:
    rest, lm = _render(1, {})
    moved, _ = _render(1, {"AU12": 1.0})
    diff = np.abs(moved - rest).mean(axis=-1)
    mouth = diff[int(lm[50, 1]) - 3 : int(lm[57, 1]) + 3, int(lm[48, 0]) - 4 : int(lm[54, 0]) + 5].mean()
    brows = diff[int(lm[19, 1]) - 4 : int(lm[19, 1]) + 4].mean()
    assert mouth > 5 * max(brows, 0.05)


def test_identity_interacts_with_actions() -> None:
    """A brow lowering does not move pixels by the same amount for every face (not additive)."""
    changes = []
    for index in range(6):
        rest, _ = _render(index, {})
        moved, _ = _render(index, {"AU4": 1.0, "AU7": 1.0})
        changes.append(np.abs(moved - rest).mean())
    assert max(changes) > 1.3 * min(changes)


def test_different_subjects_look_different() -> None:
    faces = [_render(i, {})[0] for i in range(6)]
    for i in range(6):
        for j in range(i + 1, 6):
            assert np.abs(faces[i] - faces[j]).mean() > 4.0
    landmarks = [_render(i, {})[1] for i in range(6)]
    spread = np.std(np.stack(landmarks), axis=0).mean()
    assert spread > 0.5


def test_pose_moves_features_relative_to_the_outline() -> None:
    subject = make_subject(CONFIG, 0)
    straight = render_frame(subject.identity, _state({}), _look(), SIZE, np.random.default_rng(0))
    turned_state = FrameState(
        aus={}, yaw=20.0, pitch=0.0, roll=0.0, gaze=(0.0, 0.0), center=(0.5, 0.47), scale=0.31
    )
    turned = render_frame(subject.identity, turned_state, _look(), SIZE, np.random.default_rng(0))
    nose_shift = turned.landmarks[30, 0] - straight.landmarks[30, 0]
    box_shift = (turned.box[0] + turned.box[2] - straight.box[0] - straight.box[2]) / 2
    assert nose_shift > 3.0 and abs(box_shift) < nose_shift / 2
