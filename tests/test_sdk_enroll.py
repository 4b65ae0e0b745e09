"""SDK enrollment and prediction: the same adaptation as pft_core, bad videos skipped with counts
(docs/reliability.md case 12), too few faces refused (case 13), predictions checked against C(F(x)) and
C(T(F(x))) computed by hand, and the smoothing rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_media import ASTRONAUT_FACE, noise_frames, write_video
from sdk_support import SdkWorld, shared_world
from skimage.data import astronaut

from pft.client.sdk import ClientConfig, Personalizer, smooth_probabilities
from pft.core.adaptation import AdaptConfig
from pft.core.data import VideoConfig
from pft.core.errors import TooFewFacesError
from pft.core.models import preprocess
from pft.core.personalize import PersonalizeConfig

FAST = ClientConfig(
    video=VideoConfig(isolate=False),
    personalize=PersonalizeConfig(adapt=AdaptConfig(max_iterations=8, min_iterations=4)),
)


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


def _sdk(world: SdkWorld, config: ClientConfig = FAST) -> Personalizer:
    return Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=config)


def _translator_state(p: Personalizer) -> dict[str, torch.Tensor]:
    assert p.personalization is not None
    return p.personalization.translator.state_dict()


def test_enroll_reports_and_changes_only_the_translator(world: SdkWorld) -> None:
    p = _sdk(world)
    f_before = {k: v.clone() for k, v in p.bundle.extractor.state_dict().items()}
    t0 = {k: v.clone() for k, v in p.bundle.translator.state_dict().items()}
    stages: list[tuple[str, int, int]] = []
    report = p.enroll(world.target_videos("adapt"), progress=lambda s, d, n: stages.append((s, d, n)))
    assert report.videos_given == 2 and len(report.videos_used) == 2 and not report.videos_rejected
    assert report.reconciles() and report.frames_used == 16  # 2 light clips x 8 frames, all with a face
    assert report.iterations == 8 and report.reference_subject in {"S001", "S002", "S003"}
    assert report.seconds >= report.adapt_seconds > 0
    assert ("faces", 2, 2) in stages and stages[-1] == ("adapt", 1, 1)
    assert p.enrolled
    # F and the shipped T0 are untouched; the person's T moved away from T0
    assert all(torch.equal(v, p.bundle.extractor.state_dict()[k]) for k, v in f_before.items())
    assert all(torch.equal(v, p.bundle.translator.state_dict()[k]) for k, v in t0.items())
    assert any(not torch.equal(v, t0[k]) for k, v in _translator_state(p).items())


def test_enroll_from_videos_equals_enroll_from_the_same_crops(world: SdkWorld) -> None:
    """One implementation: videos -> crops -> the same personalize() run as for cached crops."""
    from pft.core.data import (
        AnnotatedFaceDetector,
        AnnotatedLandmarkDetector,
        FaceCropConfig,
        process_videos,
    )
    from pft.core.data.datasets import VideoRecord

    videos = world.target_videos("adapt")
    a = _sdk(world)
    a.enroll(videos)
    report = process_videos(
        [VideoRecord(path=v, subject="x") for v in videos],
        FAST.video,
        FaceCropConfig(size=32),
        AnnotatedFaceDetector(),
        AnnotatedLandmarkDetector(),
    )
    crops = np.concatenate([c.crops for c in report.clips])
    vids = torch.cat([torch.full((len(c),), k) for k, c in enumerate(report.clips)])
    times = torch.cat([torch.from_numpy(c.frame_indices) for c in report.clips])
    b = _sdk(world)
    b.enroll_crops(crops, video_ids=vids, time_index=times)
    for k, v in _translator_state(a).items():
        assert torch.equal(v, _translator_state(b)[k]), k


def test_bad_videos_are_skipped_and_counted(world: SdkWorld, tmp_path: Path) -> None:
    good = world.target_videos("adapt")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.mp4"
    p = _sdk(world)
    report = p.enroll([empty, good[0], text, truncated, good[1], missing])
    assert report.videos_given == 6 and report.reconciles()
    assert report.videos_used == tuple(good) and report.frames_used == 16
    rejected = {r.path.name: r.error for r in report.videos_rejected}
    assert rejected == {
        "empty.mp4": "EmptyVideoFileError",
        "notes.mp4": "NotAVideoError",
        "cut.mp4": rejected["cut.mp4"],
        "missing.mp4": "NotAVideoError",
    }
    assert rejected["cut.mp4"] in {"TruncatedVideoError", "NotAVideoError", "NoFramesError"}
    assert all(r.path.name in r.reason for r in report.videos_rejected)
    # the bad files changed nothing: same translator as enrolling from the good videos only
    q = _sdk(world)
    q.enroll(good)
    for k, v in _translator_state(q).items():
        assert torch.equal(v, _translator_state(p)[k])


def test_a_video_without_faces_is_refused(world: SdkWorld, tmp_path: Path) -> None:
    noise = write_video(tmp_path / "noise.mp4", noise_frames(12, 120, 160))
    p = _sdk(world)
    with pytest.raises(TooFewFacesError, match=r"needs at least 8 usable face frames but found 0") as err:
        p.enroll([noise])
    assert err.value.found == 0 and err.value.needed == 8
    assert "noise.mp4" in str(err.value) and "no face" in str(err.value)
    assert not p.enrolled  # nothing learned from noise


def test_a_face_in_only_a_few_frames_is_refused(world: SdkWorld, tmp_path: Path) -> None:
    source = world.target_videos("adapt")[0]
    video = Path(shutil.copy(source, tmp_path / "few.mp4"))
    sidecar = json.loads(source.with_name(source.stem + ".faces.json").read_text())
    for k, frame in enumerate(sidecar["frames"]):
        if k >= 3:
            frame.update(box=None, landmarks=None, pose=None)
    (tmp_path / "few.faces.json").write_text(json.dumps(sidecar))
    p = _sdk(world)
    with pytest.raises(TooFewFacesError) as err:
        p.enroll([video])
    # a face in 3 of the sampled frames: the video itself is refused (under half its frames)
    assert (err.value.found, err.value.needed) == (0, 8)
    assert "few.mp4" in str(err.value) and "a face in only 3 of" in str(err.value)
    p.enroll([video, *world.target_videos("adapt")])  # with enough faces overall it adapts
    assert p.enrolled


def test_predict_matches_source_model_then_personal_model(world: SdkWorld) -> None:
    from pft.core.data import AnnotatedFaceDetector, AnnotatedLandmarkDetector, FaceCropConfig
    from pft.core.data.datasets import VideoRecord
    from pft.core.data.pipeline import extract_face_clip

    video = world.target_videos("eval", "pain")[0]
    clip = extract_face_clip(
        VideoRecord(path=video, subject="x"),
        FAST.video,
        FaceCropConfig(size=32),
        AnnotatedFaceDetector(),
        AnnotatedLandmarkDetector(),
    )
    p = _sdk(world)
    b = p.bundle
    x = preprocess(clip.crops, 32)
    before = p.predict(video)
    with torch.no_grad():
        want = torch.softmax(b.classifier(b.extractor(x)), 1).numpy()
    assert not before.personalized and before.frames_given == clip.sampled_frames
    np.testing.assert_allclose(before.probabilities, want, atol=1e-6)
    np.testing.assert_array_equal(before.frame_indices, clip.frame_indices)
    p.enroll(world.target_videos("adapt"))
    after = p.predict(video)
    per = p.personalization
    assert per is not None and after.personalized
    with torch.no_grad():
        translated = per.translator(b.extractor(x), per.style_target, per.style_reference)
        want_after = torch.softmax(b.classifier(translated), 1).numpy()
    np.testing.assert_allclose(after.probabilities, want_after, atol=1e-6)
    assert not np.allclose(after.probabilities, before.probabilities)
    np.testing.assert_allclose(after.smoothed, want_after.mean(0), atol=1e-6)
    assert after.label == p.class_names[int(want_after.mean(0).argmax())]
    assert np.allclose(after.probabilities.sum(1), 1.0, atol=1e-5)


def test_smoothing_rules_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(smooth_probabilities(probs, "mean", 0.3), [0.5, 0.5], atol=1e-6)
    # e1 = p1; e2 = .5 p2 + .5 e1 = [.55, .45]; e3 = .5 p3 + .5 e2 = [.475, .525]
    np.testing.assert_allclose(smooth_probabilities(probs, "ema", 0.5), [0.475, 0.525], atol=1e-6)
    with pytest.raises(ValueError):
        smooth_probabilities(probs[:0], "mean", 0.5)


def test_predict_on_camera_frames_finds_the_real_face(world: SdkWorld) -> None:
    image = astronaut()[:300, 100:400].copy()  # a real face, Haar-detected
    blank = np.zeros_like(image)
    p = _sdk(world)
    pred = p.predict(np.stack([blank, image, blank]))
    assert pred.frames_given == 3 and pred.frame_indices.tolist() == [1]
    single = p.predict(image)
    np.testing.assert_allclose(single.probabilities, pred.probabilities, atol=1e-6)
    x0, y0, x1, y1 = ASTRONAUT_FACE
    crop = p.predict_crops(
        np.asarray(
            torch.nn.functional.interpolate(
                torch.from_numpy(astronaut()[y0:y1, x0:x1].copy()).permute(2, 0, 1)[None].float(),
                size=(32, 32),
                mode="area",
            )[0]
            .permute(1, 2, 0)
            .round()
            .to(torch.uint8)
        )
    )
    assert crop.probabilities.shape == (1, 2)
    from pft.core.errors import NoFaceError

    with pytest.raises(NoFaceError):
        p.predict(blank)
    with pytest.raises(ValueError, match="uint8"):
        p.predict(image.astype(np.float32))
