"""The fused personalised model: ONNX (onnxruntime) and TorchScript parity with the PyTorch model
on real frames (crops of a cohort video and of the astronaut photograph), uint8 and float input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from data_media import ASTRONAUT_FACE
from sdk_support import SdkWorld, shared_world
from skimage.data import astronaut

from pft.client.export import PersonalizedModel
from pft.client.sdk import ClientConfig, Personalizer
from pft.core.adaptation import AdaptConfig
from pft.core.data import (
    AnnotatedFaceDetector,
    AnnotatedLandmarkDetector,
    FaceBox,
    FaceCropConfig,
    VideoConfig,
    crop_face,
)
from pft.core.data.datasets import VideoRecord
from pft.core.data.pipeline import extract_face_clip
from pft.core.personalize import PersonalizeConfig

FAST = ClientConfig(
    video=VideoConfig(isolate=False),
    personalize=PersonalizeConfig(adapt=AdaptConfig(max_iterations=8, min_iterations=4)),
)


@pytest.fixture()
def world(tmp_path_factory: pytest.TempPathFactory) -> SdkWorld:
    return shared_world(tmp_path_factory)


def _real_crops(world: SdkWorld) -> np.ndarray:
    """Face crops (32 px) of a cohort eval video and of the astronaut's real face."""
    video = world.target_videos("eval", "pain")[0]
    clip = extract_face_clip(
        VideoRecord(path=video, subject="x"),
        FAST.video,
        FaceCropConfig(size=32),
        AnnotatedFaceDetector(),
        AnnotatedLandmarkDetector(),
    )
    x0, y0, x1, y1 = ASTRONAUT_FACE
    face = crop_face(astronaut(), FaceBox(x0, y0, x1, y1), 32, 0.15)
    return np.concatenate([clip.crops, face[None]])


def _enrolled(world: SdkWorld) -> Personalizer:
    p = Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=FAST)
    p.enroll(world.target_videos("adapt"))
    return p


def test_fused_model_equals_the_sdk(world: SdkWorld) -> None:
    p = _enrolled(world)
    crops = _real_crops(world)
    with torch.no_grad():
        fused = p.fused_model()(torch.from_numpy(crops)).numpy()
        fused_float = p.fused_model()(torch.from_numpy(crops).float()).numpy()
    want = p.predict_crops(crops).probabilities
    np.testing.assert_allclose(fused, want, atol=1e-6)
    np.testing.assert_array_equal(fused, fused_float)
    source = Personalizer.from_bundle(world.bundle_v1, world.public_pem, config=FAST)
    with torch.no_grad():
        unpersonalised = source.fused_model()(torch.from_numpy(crops)).numpy()
    np.testing.assert_allclose(unpersonalised, source.predict_crops(crops).probabilities, atol=1e-6)
    assert not np.allclose(unpersonalised, fused)  # T is really inside
    with pytest.raises(ValueError, match="both style codes"):
        PersonalizedModel(p.bundle.extractor, p.bundle.classifier, p.bundle.translator)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_onnx_export_matches_pytorch_on_real_frames(world: SdkWorld, tmp_path: Path, dtype: str) -> None:
    p = _enrolled(world)
    crops = _real_crops(world)
    path = p.export(tmp_path / "out" / "personal.onnx", "onnx", input_dtype=dtype)  # type: ignore[arg-type]
    assert path.is_file() and not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = crops if dtype == "uint8" else crops.astype(np.float32)
    (got,) = session.run(["probabilities"], {"images": feed})
    (one,) = session.run(["probabilities"], {"images": feed[:1]})  # dynamic batch
    want = p.predict_crops(crops).probabilities
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) < 1e-4
    assert float(np.abs(one - want[:1]).max()) < 1e-4
    meta = {m.key: json.loads(m.value) for m in onnx.load(str(path)).metadata_props}
    assert meta["pft.class_names"] == ["neutral", "pain"] and meta["pft.personalized"] is True
    assert meta["pft.bundle_digest"] == p.bundle_digest


def test_torchscript_export_matches_pytorch_on_real_frames(world: SdkWorld, tmp_path: Path) -> None:
    p = _enrolled(world)
    crops = _real_crops(world)
    path = p.export(tmp_path / "personal.pt", "torchscript")
    extra = {"pft.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        got = loaded(torch.from_numpy(crops)).numpy()
        one = loaded(torch.from_numpy(crops[:1])).numpy()
    want = p.predict_crops(crops).probabilities
    assert float(np.abs(got - want).max()) < 1e-4
    assert float(np.abs(one - want[:1]).max()) < 1e-4
    assert json.loads(extra["pft.json"])["class_names"] == ["neutral", "pain"]
    with pytest.raises(ValueError, match="unknown export format"):
        p.export(tmp_path / "x.bin", "tflite")  # type: ignore[arg-type]
    assert not (tmp_path / "x.bin").exists()
