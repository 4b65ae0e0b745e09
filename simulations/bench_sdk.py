"""How fast the on-device SDK is on this CPU: enrollment, per-frame prediction, export size, memory.

``python -m pft.simulations.bench_sdk [--out DIR] [--repeats N]`` builds a signed demo bundle (the
default ``ModelConfig``: width 16, 64-px crops; random-initialised F, C, T with source styles
computed from a tiny synthetic cohort - speed does not depend on training), writes a 10-second
neutral video of a REAL face (the astronaut photograph, slowly panning and zooming, 15 fps,
240x240, H.264) and measures

- enrollment end to end (decode in the isolated worker, Haar face detection, crop, F's features,
  stage-3 adaptation): cold (a new ``Personalizer``, so the decoder process starts) and warm;
- prediction latency per frame at batch 1: a face crop through the SDK (``predict_crops``),
  the exported ONNX model in onnxruntime, and a whole 240x240 camera frame (Haar + crop + model);
- the exported ONNX and TorchScript sizes;
- peak RSS of a fresh process that only enrolls (``resource.getrusage``; decoder child separate).

Medians over ``repeats`` runs. Other jobs may share the machine: numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pft.core.bundle import save_bundle
from pft.core.cohort import CohortConfig, make_cohort
from pft.core.data import (
    AnnotatedFaceDetector,
    AnnotatedLandmarkDetector,
    DatasetIndex,
    FaceCropConfig,
    VideoConfig,
    load_dataset,
    process_videos,
)
from pft.core.domain import TrainingDomain
from pft.core.machine import describe_machine
from pft.core.models import ModelConfig, build_parts
from pft.core.signing import generate_signing_key, save_public_key, sign_bundle
from pft.core.training import SubjectFeatures, extract_features, source_styles

__all__ = ["bench_sdk", "build_demo_bundle", "write_astronaut_video"]


def build_demo_bundle(
    index: DatasetIndex,
    out: Path,
    key: Ed25519PrivateKey,
    model_config: ModelConfig,
    *,
    version: int = 1,
    seed: int = 0,
) -> Path:
    """A signed bundle with random-initialised F, C, T and real source styles from ``index``.

    The source subjects' train videos go through the annotated-face pipeline; the style
    normaliser, styles and cosine-pairing descriptors come from F's features of those frames.
    """
    torch.manual_seed(seed)
    config = model_config.model_copy(update={"num_classes": len(index.classes)})
    extractor, classifier, translator = build_parts(config)
    torch.nn.init.normal_(translator.out.weight, std=0.05)  # not the identity: T matters
    for m in (extractor, classifier, translator):
        m.eval()
    report = process_videos(
        list(index.filter(role="source", split="train").records),
        VideoConfig(isolate=False),
        FaceCropConfig(size=config.image_size),
        AnnotatedFaceDetector(),
        AnnotatedLandmarkDetector(),
    )
    subjects: dict[str, SubjectFeatures] = {}
    for subject in sorted({c.record.subject for c in report.clips}):
        clips = [c for c in report.clips if c.record.subject == subject]
        f, s = extract_features(extractor, np.concatenate([c.crops for c in clips]))
        labels = torch.cat(
            [
                torch.full((len(c),), index.classes.index(c.record.label or ""), dtype=torch.long)
                for c in clips
            ]
        )
        subjects[subject] = SubjectFeatures(f, s, labels, 0)
    normalizer, styles = source_styles(subjects)
    descriptors = {n: s.features[s.neutral_mask].double().mean(0).numpy() for n, s in subjects.items()}
    save_bundle(
        out,
        extractor=extractor,
        classifier=classifier,
        translator=translator,
        normalizer=normalizer,
        model_config=config,
        class_names=list(index.classes),
        source_styles=styles.as_tensors(),
        descriptors=descriptors,
        bundle_version=version,
        extra={
            "pairing": "cosine",
            "domain": TrainingDomain.for_model(
                "synthetic", "synthetic:demo", index.classes, config
            ).as_json(),
        },
    )
    sign_bundle(out, key)
    return out


def write_astronaut_video(path: Path, seconds: float = 10.0, fps: int = 15, size: int = 240) -> Path:
    """A neutral real-face video: the astronaut photograph panned and zoomed slowly (H.264)."""
    import av
    import cv2
    from skimage.data import astronaut

    image = astronaut()
    n = round(seconds * fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream: Any = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        for i in range(n):
            t = i / max(n - 1, 1)
            side = int(320 - 60 * np.sin(np.pi * t))  # zoom in and out
            x = int(60 + 40 * np.sin(2 * np.pi * t))
            y = int(10 + 20 * t)
            frame = cv2.resize(image[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def _enroll_child(bundle: str, pem: str, video: str) -> None:
    """Enroll once in this (fresh) process and print its peak RSS in MB as JSON."""
    from pft.client.sdk import Personalizer

    with tempfile.TemporaryDirectory() as state, Personalizer.from_bundle(bundle, pem, state_dir=state) as p:
        report = p.enroll([video])
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        json.dumps(
            {
                "peak_rss_mb": self_kb / 1024,
                "decoder_peak_rss_mb": child_kb / 1024,
                "frames": report.frames_used,
            }
        )
    )


def bench_sdk(work_dir: Path, repeats: int = 3) -> dict[str, Any]:
    """Run every measurement (see the module docstring) and return the numbers."""
    from pft.client.sdk import Personalizer

    work_dir.mkdir(parents=True, exist_ok=True)
    cohort = work_dir / "cohort"
    if not (cohort / "manifest.json").is_file():
        make_cohort(
            CohortConfig(
                profile="biovid", seed=0, source_subjects=3, target_subjects=1, light=True, workers=1
            ),
            cohort,
        )
    key = generate_signing_key()
    pem = save_public_key(key.public_key(), work_dir / "bundle-signing.pub")
    bundle_dir = work_dir / f"bundle-{time.time_ns()}"
    model_config = ModelConfig()
    build_demo_bundle(load_dataset(cohort, "synthetic"), bundle_dir, key, model_config)
    video = write_astronaut_video(work_dir / "astronaut_neutral_10s.mp4")

    cold, warm, adapt, frames, iters = [], [], [], 0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        with Personalizer.from_bundle(bundle_dir, pem) as p:
            report = p.enroll([video])
            cold.append(time.perf_counter() - t0)
            frames, iters = report.frames_used, report.iterations
            adapt.append(report.adapt_seconds)
            t1 = time.perf_counter()
            p.enroll([video])
            warm.append(time.perf_counter() - t1)

    p = Personalizer.from_bundle(bundle_dir, pem)
    p.enroll([video])
    crop = p.predict(video)  # warm the model
    from pft.core.data import HaarFaceDetector, crop_face, decode_video

    frame = decode_video(video, VideoConfig(max_frames=1, isolate=False)).frames[0]
    boxes = HaarFaceDetector().detect(frame)
    one = crop_face(frame, boxes[0], model_config.image_size, 0.15)[None]
    n_lat = max(20, 10 * repeats)
    predict_crop_ms = _median_ms(lambda: p.predict_crops(one), n_lat)
    predict_frame_ms = _median_ms(lambda: p.predict(frame), max(5, repeats * 3))
    onnx_path = p.export(work_dir / "personal.onnx", "onnx")
    ts_path = p.export(work_dir / "personal.pt", "torchscript")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    onnx_ms = _median_ms(lambda: session.run(None, {"images": one}), n_lat)
    p.close()

    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pft.simulations.bench_sdk",
            "--enroll-child",
            str(bundle_dir),
            str(pem),
            str(video),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rss = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "machine": describe_machine(),
        "model": model_config.model_dump(mode="json"),
        "video": {
            "seconds": 10.0,
            "fps": 15,
            "size": 240,
            "frames_used": frames,
            "source": "astronaut pan/zoom",
        },
        "enroll_cold_s": round(statistics.median(cold), 2),
        "enroll_warm_s": round(statistics.median(warm), 2),
        "adapt_iterations": iters,
        "adapt_s": round(statistics.median(adapt), 2),
        "predict_crop_ms_batch1": predict_crop_ms,
        "predict_onnx_ms_batch1": onnx_ms,
        "predict_camera_frame_ms": predict_frame_ms,
        "onnx_mb": round(onnx_path.stat().st_size / 1e6, 2),
        "torchscript_mb": round(ts_path.stat().st_size / 1e6, 2),
        "enroll_peak_rss_mb": round(rss["peak_rss_mb"], 1),
        "decoder_peak_rss_mb": round(rss["decoder_peak_rss_mb"], 1),
        "repeats": repeats,
        "smoothed_label_example": crop.label,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: print the numbers as JSON (and write them to ``--out``/bench_sdk.json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enroll-child", nargs=3, metavar=("BUNDLE", "PEM", "VIDEO"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.enroll_child:
        _enroll_child(*args.enroll_child)
        return
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            result = bench_sdk(Path(tmp), args.repeats)
    else:
        result = bench_sdk(args.out, args.repeats)
        (args.out / "bench_sdk.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
