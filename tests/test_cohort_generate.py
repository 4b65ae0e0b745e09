"""The cohort generator: determinism, real H.264 files, digests, splits and sidecars."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from pft.core.cohort import CohortConfig, load_manifest, make_cohort
from pft.core.cohort.config import GENERATOR_VERSION
from pft.core.cohort.generate import plan_clips
from pft.core.errors import DatasetLayoutError

TINY = {"source_subjects": 2, "target_subjects": 2, "frame_size": 64, "frames_per_clip": 6}


def _decode(path: Path) -> tuple[str, list[np.ndarray]]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return codec, frames


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(CohortConfig(**TINY, workers=1), out)
    return out


def test_every_video_is_h264_with_the_stated_frames_and_digest(cohort: Path) -> None:
    manifest = load_manifest(cohort)
    assert manifest.format == "pft-cohort/1"
    assert manifest.classes == ["neutral", "pain"]
    assert manifest.generator_version == GENERATOR_VERSION
    # biovid clips: source 3 train per class; target 3 adapt (neutral), 8 oracle and 3 eval per class
    assert len(manifest.videos) == 2 * (3 * 2) + 2 * (3 + 8 * 2 + 3 * 2)
    for entry in manifest.videos:
        path = cohort / entry.path
        assert path.name == f"{entry.split}_{entry.clip}.mp4"
        assert path.parent == cohort / entry.subject / entry.label
        codec, frames = _decode(path)
        assert codec == "h264"
        assert len(frames) == entry.frames == 6
        assert frames[0].shape == (64, 64, 3)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


def test_target_splits_keep_adaptation_apart_from_evaluation(cohort: Path) -> None:
    manifest = load_manifest(cohort)
    targets = manifest.subjects_of("target")
    assert [s.id for s in targets] == ["S003", "S004"]
    for subject in targets:
        adapt = manifest.videos_of(subject=subject.id, split="adapt")
        evaluation = manifest.videos_of(subject=subject.id, split="eval")
        assert len(adapt) == 3 and {v.label for v in adapt} == {"neutral"}
        assert {v.label for v in evaluation} == set(manifest.classes)
        assert {v.label for v in manifest.videos_of(subject=subject.id, split="oracle")} == set(
            manifest.classes
        )
        assert not {v.path for v in adapt} & {v.path for v in evaluation}
        assert not {v.sha256 for v in adapt} & {v.sha256 for v in evaluation}
    for subject in manifest.subjects_of("source"):
        assert {v.split for v in manifest.videos_of(subject=subject.id)} == {"train"}


def test_sidecars_hold_landmarks_inside_the_face_box(cohort: Path) -> None:
    manifest = load_manifest(cohort)
    for entry in manifest.videos[::5]:
        sidecar = json.loads((cohort / entry.sidecar).read_text())
        assert sidecar["frame_size"] == [64, 64]
        assert len(sidecar["frames"]) == entry.frames
        for frame in sidecar["frames"]:
            x0, y0, x1, y1 = frame["box"]
            lm = np.array(frame["landmarks"])
            assert lm.shape == (68, 2)
            assert (lm[:, 0] >= x0).all() and (lm[:, 0] <= x1).all()
            assert (lm[:, 1] >= y0).all() and (lm[:, 1] <= y1).all()
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # iBUG order: brows above eyes above nose tip above mouth above chin
            assert lm[17:27, 1].mean() < lm[36:48, 1].mean() < lm[30, 1] < lm[48:68, 1].mean() < lm[8, 1]
            assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]
            assert len(frame["pose"]) == 3 and "AU4" in frame["au"]
            if entry.label == "neutral":
                assert frame["intensity"] == 0.0


def test_same_seed_same_cohort_whatever_the_worker_count(cohort: Path, tmp_path: Path) -> None:
    again = make_cohort(CohortConfig(**TINY, workers=2), tmp_path / "again")
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (cohort / "manifest.json").read_bytes()
    entry = again.videos[-1]
    _, first = _decode(cohort / entry.path)
    _, second = _decode(tmp_path / "again" / entry.path)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_another_seed_gives_another_cohort(cohort: Path, tmp_path: Path) -> None:
    other = make_cohort(CohortConfig(**TINY, seed=1, workers=1), tmp_path / "other")
    base = load_manifest(cohort)
    assert {v.sha256 for v in other.videos}.isdisjoint({v.sha256 for v in base.videos})
    assert [s.expressiveness for s in other.subjects] != [s.expressiveness for s in base.subjects]


def test_subject_identity_does_not_depend_on_cohort_size(cohort: Path, tmp_path: Path) -> None:
    bigger = make_cohort(CohortConfig(**{**TINY, "source_subjects": 3}, workers=1), tmp_path / "big")
    base = load_manifest(cohort)
    assert bigger.subjects[0] == base.subjects[0]
    assert bigger.videos[0].sha256 == base.videos[0].sha256


def test_light_mode_makes_fewer_smaller_clips(tmp_path: Path) -> None:
    config = CohortConfig(profile="affwild2", source_subjects=1, target_subjects=1, light=True, workers=1)
    manifest = make_cohort(config, tmp_path)
    assert manifest.frame_size == 64 and manifest.frames_per_clip == 8
    assert len(manifest.classes) == 7
    expected = len(plan_clips(config, "source")) + len(plan_clips(config, "target"))
    assert len(manifest.videos) == expected == 7 + (2 + 7 + 7)
    codec, frames = _decode(tmp_path / manifest.videos[0].path)
    assert codec == "h264" and len(frames) == 8 and frames[0].shape == (64, 64, 3)


def test_load_manifest_names_a_missing_cohort(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"manifest\.json"):
        load_manifest(tmp_path)


def test_mixed_bursts_cover_every_frame_and_change_over_the_clip() -> None:
    from pft.core.cohort.generate import _mixed_envelopes

    for seed in range(20):
        env = _mixed_envelopes(np.random.default_rng(seed), 16, ["AU12", "AU15", "AU4"])
        stack = np.stack(list(env.values()))
        assert ((stack >= 0.5).sum(0) >= 2).all()  # two conflicting actions show in every frame
        assert stack.max() <= 1.0 and stack.min() >= 0.0
    # the signals change over the clip: each action is off somewhere and fully on somewhere
    env = _mixed_envelopes(np.random.default_rng(3), 64, ["AU12", "AU15", "AU4", "AU24"])
    assert all(e.min() == 0.0 and e.max() == 1.0 for e in env.values())


def test_sustained_apex_covers_most_frames() -> None:
    from pft.core.cohort.generate import _sustained_envelope

    shares = [float((_sustained_envelope(np.random.default_rng(s), 16) > 0.99).mean()) for s in range(50)]
    assert min(shares) >= 0.6 and float(np.mean(shares)) >= 0.75


def test_cohort_cache_key_follows_the_generator_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import pft.core.cohort.config as cohort_config

    config = CohortConfig(profile="stressid", seed=4)
    before = config.config_hash()
    monkeypatch.setattr(cohort_config, "GENERATOR_VERSION", cohort_config.GENERATOR_VERSION + 1)
    assert config.config_hash() != before


def test_frame_store_reads_the_annotated_actions_of_each_crop(cohort: Path, tmp_path: Path) -> None:
    from pft.core.cohort.profiles import AU_NAMES
    from pft.core.data import FaceCropConfig, VideoConfig
    from pft.core.frames import FrameStore
    from pft.simulations.workspace import open_cohort

    index = open_cohort(cohort)
    records = [r for r in index.records if r.split == "train"][:3]
    store = FrameStore(index, tmp_path / "cache", VideoConfig(), FaceCropConfig(margin=0.0))
    store.load_frames(records)
    crops, _ = store.crops_and_labels(records)
    actions = store.annotated_actions(records)
    assert actions is not None and actions.shape == (len(crops), len(AU_NAMES))
    sidecar = json.loads(records[0].path.with_suffix(".faces.json").read_text())
    first = store.videos[records[0].path].frame_indices
    expected = [sidecar["frames"][int(i)]["au"].get(name, 0.0) for name in AU_NAMES for i in first[:1]]
    assert np.allclose(actions[0], expected)


def test_frame_store_workers_give_the_same_crops_in_the_same_order(cohort: Path, tmp_path: Path) -> None:
    """Two decode-and-crop workers (interleaved shares of the videos) against one: the same crops,
    frame indices and landmarks per video, the store's videos in the records' order, and the
    progress callback counting every video once."""
    from pft.core.data import FaceCropConfig, VideoConfig
    from pft.core.frames import FrameStore
    from pft.simulations.workspace import open_cohort

    index = open_cohort(cohort)
    records = list(index.records)[:7]
    stores, ticks = {}, {}
    for workers in (1, 2):
        seen: list[int] = []
        store = FrameStore(
            index, tmp_path / f"cache{workers}", VideoConfig(), FaceCropConfig(margin=0.0), workers=workers
        )
        store.load_frames(records, progress=lambda done, total, seen=seen: seen.append(done))
        stores[workers], ticks[workers] = store, seen
    one, two = stores[1], stores[2]
    assert list(two.videos) == list(one.videos) == [r.path for r in records if r.path in one.videos]
    for path, video in one.videos.items():
        other = two.videos[path]
        assert np.array_equal(video.crops, other.crops) and np.array_equal(
            video.frame_indices, other.frame_indices
        )
        assert (video.landmarks is None) == (other.landmarks is None)
        if video.landmarks is not None and other.landmarks is not None:
            assert np.array_equal(video.landmarks, other.landmarks, equal_nan=True)
    assert sorted(ticks[2]) == list(range(1, len(records) + 1)) == ticks[1]
