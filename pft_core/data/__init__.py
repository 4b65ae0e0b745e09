"""The video pipeline, the same for the synthetic cohort and real videos.

decode (PyAV, isolated worker) -> sample frames -> detect faces -> landmarks -> align and crop,
with typed errors for bad input, dataset loaders, and a content-addressed feature cache.

The cache names (``FeatureCache``, ``file_sha256``, ``state_dict_sha256``) are loaded lazily:
they need torch, and the decoding worker process imports this package without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pft.core.data.datasets import DatasetIndex, VideoRecord, layout_names, load_dataset, register_layout
from pft.core.data.faces import AnnotatedFaceDetector, FaceBox, FaceDetector, HaarFaceDetector, crop_face
from pft.core.data.landmarks import (
    AnnotatedLandmarkDetector,
    DlibLandmarkDetector,
    LandmarkDetector,
    eye_centres,
    geometry_descriptor,
)
from pft.core.data.pipeline import (
    BatchReport,
    FaceClip,
    FaceCropConfig,
    Rejection,
    extract_face_clip,
    process_videos,
)
from pft.core.data.video import DecodedVideo, VideoConfig, VideoDecoder, VideoInfo, decode_video, probe_video

if TYPE_CHECKING:
    from pft.core.data.cache import FeatureCache, file_sha256, state_dict_sha256

_LAZY = {"FeatureCache", "file_sha256", "state_dict_sha256"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pft.core.data import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'pft.core.data' has no attribute {name!r}")


__all__ = [
    "AnnotatedFaceDetector",
    "AnnotatedLandmarkDetector",
    "BatchReport",
    "DatasetIndex",
    "DecodedVideo",
    "DlibLandmarkDetector",
    "FaceBox",
    "FaceClip",
    "FaceCropConfig",
    "FaceDetector",
    "FeatureCache",
    "HaarFaceDetector",
    "LandmarkDetector",
    "Rejection",
    "VideoConfig",
    "VideoDecoder",
    "VideoInfo",
    "VideoRecord",
    "crop_face",
    "decode_video",
    "extract_face_clip",
    "eye_centres",
    "file_sha256",
    "geometry_descriptor",
    "layout_names",
    "load_dataset",
    "probe_video",
    "process_videos",
    "register_layout",
    "state_dict_sha256",
]
