"""The frame store: face crops and F's features of a dataset's videos, computed once and cached.

Used by every place that turns videos into what adaptation reads: the in-process experiment, the
Flower ClientApp on a node with a dataset folder, and the benchmarks. Two caches under one root:
``frames/`` (face crops, landmarks and poses per video, keyed by the video's SHA-256 and the
decode/crop settings) and ``features/`` (F's outputs per video, keyed additionally by F's weights
hash), so a video is never decoded or embedded twice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pft.core.cohort.profiles import AU_NAMES
from pft.core.data import (
    BatchReport,
    DatasetIndex,
    FaceCropConfig,
    VideoConfig,
    VideoRecord,
    geometry_descriptor,
    process_videos,
)
from pft.core.data.cache import FeatureCache, file_sha256, state_dict_sha256
from pft.core.data.detectors import make_detector
from pft.core.data.faces import sidecar_frame
from pft.core.errors import PFTError
from pft.core.models import FeatureExtractor
from pft.core.training import extract_features

__all__ = ["FrameSet", "FrameStore", "Step", "VideoFrames"]

Step = Callable[[int, int], None]
"""``step(done, total)`` progress callback."""


@dataclass
class VideoFrames:
    """The usable frames of one video: face crops, landmarks, poses, and where they came from."""

    record: VideoRecord
    sha256: str
    crops: np.ndarray  # uint8 (N, S, S, 3)
    frame_indices: np.ndarray  # int64 (N,)
    landmarks: np.ndarray | None  # float32 (N, 68, 2)
    poses: np.ndarray | None  # float32 (N, 3)


@dataclass
class FrameSet:
    """Frames of one person in one split, concatenated over videos, with F's outputs."""

    features: Tensor  # (N, D)
    frame_stats: Tensor  # (N, 2*C_taps)
    labels: Tensor  # (N,) long; -1 where unknown
    video_ids: Tensor  # (N,) long
    time_index: Tensor  # (N,) long (frame index within its video)
    descriptors: np.ndarray | None  # (N, 139) landmark geometry + pose, NaN rows where unknown

    def __len__(self) -> int:
        return len(self.features)

    def select(self, mask: Tensor) -> FrameSet:
        """The frames where ``mask`` is true."""
        idx = torch.nonzero(mask).flatten()
        return FrameSet(
            self.features[idx],
            self.frame_stats[idx],
            self.labels[idx],
            self.video_ids[idx],
            self.time_index[idx],
            None if self.descriptors is None else self.descriptors[idx.numpy()],
        )

    def mean_descriptor(self) -> np.ndarray | None:
        """The person's mean landmark descriptor over these frames (None without landmarks)."""
        if self.descriptors is None:
            return None
        rows = self.descriptors[~np.isnan(self.descriptors).any(axis=1)]
        return rows.mean(axis=0) if len(rows) else None


class FrameStore:
    """Face crops and features of a dataset's videos, computed once and cached on disk."""

    def __init__(
        self,
        index: DatasetIndex,
        cache_root: Path,
        video_config: VideoConfig,
        crop_config: FaceCropConfig,
        detector: str | None = None,
        workers: int | None = None,
    ) -> None:
        """``workers``: videos decoded and cropped at once (each with its own decoder process and
        detector); default two on a machine with two or more cores. The crops do not depend on it."""
        self.index = index
        self.workers = max(1, workers if workers is not None else min(2, os.cpu_count() or 1))
        self.video_config = video_config
        self.crop_config = crop_config
        self.frame_cache = FeatureCache(cache_root / "frames")
        self.feature_cache = FeatureCache(cache_root / "features")
        # the cohort's sidecars for the synthetic layout, a real detector (default dlib HOG) otherwise
        self.detector = detector or ("annotated" if index.layout == "synthetic" else "auto")
        self._settings = video_config.config_hash() + crop_config.config_hash()
        if self.detector != "annotated":
            self._settings += self.detector
        self.videos: dict[Path, VideoFrames] = {}
        self.rejected: list[tuple[Path, str]] = []

    def load_frames(self, records: Sequence[VideoRecord], progress: Step | None = None) -> None:
        """Decode, detect and crop every video not already loaded (cached per video content)."""
        todo: list[tuple[VideoRecord, str]] = []
        for done, record in enumerate(records, start=1):
            if record.path in self.videos:
                continue
            sha = file_sha256(record.path)
            cached = self.frame_cache.get(FeatureCache.key("frames", sha, self._settings))
            if cached is None:
                todo.append((record, sha))
                continue
            self.videos[record.path] = VideoFrames(
                record,
                sha,
                cached["crops"].numpy(),
                cached["frame_indices"].numpy(),
                cached["landmarks"].numpy() if "landmarks" in cached else None,
                cached["poses"].numpy() if "poses" in cached else None,
            )
            if progress is not None:
                progress(done - len(todo), len(records))
        if not todo:
            return
        base = len(records) - len(todo)
        shas = {r.path: s for r, s in todo}
        workers = min(self.workers, len(todo))
        lock, finished = threading.Lock(), [0]

        def tick(_done: int, _total: int, _path: Path) -> None:
            with lock:
                finished[0] += 1
                if progress is not None:
                    progress(base + finished[0], len(records))

        def run(part: list[VideoRecord]) -> BatchReport:
            face, marks = make_detector(self.detector)  # one detector per worker (not shared)
            return process_videos(part, self.video_config, self.crop_config, face, marks, progress=tick)

        parts = [[r for r, _ in todo[k::workers]] for k in range(workers)]
        if workers == 1:
            reports = [run(parts[0])]
        else:  # decoding runs in each worker's decoder process, so two workers overlap it
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pft-faces") as pool:
                reports = list(pool.map(run, parts))
        by_path = {clip.record.path: clip for rep in reports for clip in rep.clips}
        rejected = {r.path: r for rep in reports for r in rep.rejected}
        report = BatchReport(
            [by_path[r.path] for r, _ in todo if r.path in by_path],
            [rejected[r.path] for r, _ in todo if r.path in rejected],
            len(todo),
        )
        for clip in report.clips:
            sha = shas[clip.record.path]
            tensors = {
                "crops": torch.from_numpy(np.ascontiguousarray(clip.crops)),
                "frame_indices": torch.from_numpy(clip.frame_indices.astype(np.int64)),
            }
            if clip.landmarks is not None:
                tensors["landmarks"] = torch.from_numpy(clip.landmarks.astype(np.float32))
            if clip.poses is not None:
                tensors["poses"] = torch.from_numpy(clip.poses.astype(np.float32))
            self.frame_cache.put(FeatureCache.key("frames", sha, self._settings), tensors)
            self.videos[clip.record.path] = VideoFrames(
                clip.record, sha, clip.crops, clip.frame_indices, clip.landmarks, clip.poses
            )
        self.rejected.extend((r.path, r.reason) for r in report.rejected)

    def crops_and_labels(self, records: Sequence[VideoRecord]) -> tuple[np.ndarray, np.ndarray]:
        """All crops of ``records`` (loaded videos only) and their class indices."""
        crops, labels = [], []
        for record in records:
            video = self.videos.get(record.path)
            if video is None:
                continue
            classes, keep = self._kept(record, video)
            crops.append(video.crops[keep])
            labels.append(classes[keep])
        if not crops:
            raise ValueError("no usable frames in these videos")
        return np.concatenate(crops), np.concatenate(labels)

    def annotated_actions(self, records: Sequence[VideoRecord]) -> np.ndarray | None:
        """The renderer's facial-action values (N, len(AU_NAMES)) of the frames ``crops_and_labels``
        returns for ``records`` (same rows), from the videos' sidecars; ``None`` when a video has
        no sidecar or a frame no ``au`` entry (real datasets)."""
        rows: list[np.ndarray] = []
        for record in records:
            video = self.videos.get(record.path)
            if video is None:
                continue
            _, keep = self._kept(record, video)
            try:  # the same frames as crops_and_labels
                kept = video.frame_indices[keep]
                entries = [sidecar_frame(record.path, int(i)) for i in kept]
            except (PFTError, OSError, ValueError):
                return None
            for entry in entries:
                actions = entry.get("au") if entry else None
                if not isinstance(actions, dict):
                    return None
                rows.append(np.array([float(actions.get(n, 0.0)) for n in AU_NAMES], dtype=np.float32))
        return np.stack(rows) if rows else None

    def _class(self, record: VideoRecord) -> int:
        return self.index.classes.index(record.label) if record.label in self.index.classes else -1

    def _kept(self, record: VideoRecord, video: VideoFrames) -> tuple[np.ndarray, np.ndarray]:
        """Each crop's class index and which crops a record keeps: all of them, or, for a per-frame
        labelled record (a segment of a video), only its labelled frames."""
        classes = self._frame_classes(record, video)
        keep = classes >= 0 if record.frame_labels is not None else np.ones(len(classes), bool)
        return classes, keep

    def _frame_classes(self, record: VideoRecord, video: VideoFrames) -> np.ndarray:
        """Class index of each crop: the record's label, or its per-frame labels (-1 = none)."""
        if record.frame_labels is None:
            return np.full(len(video.crops), self._class(record), dtype=np.int64)
        n = len(record.frame_labels)
        names = [record.frame_labels[i] if i < n else None for i in video.frame_indices.tolist()]
        index = {c: k for k, c in enumerate(self.index.classes)}
        return np.array([index.get(x, -1) if x is not None else -1 for x in names], dtype=np.int64)

    def frame_set(
        self,
        records: Sequence[VideoRecord],
        extractor: FeatureExtractor,
        extractor_hash: str | None = None,
    ) -> FrameSet:
        """F's outputs for the frames of ``records`` (cached per video and F weights)."""
        f_hash = extractor_hash or state_dict_sha256(extractor.state_dict())
        feats, stats, labels, vids, times, descs = [], [], [], [], [], []
        has_landmarks = True
        for vid, record in enumerate(records):
            video = self.videos.get(record.path)
            if video is None:
                continue
            key = FeatureCache.key("features", video.sha256, self._settings, f_hash)
            cached = self.feature_cache.get(key)
            if cached is None:
                f, s = extract_features(extractor, video.crops)
                cached = {"features": f.contiguous(), "frame_stats": s.contiguous()}
                self.feature_cache.put(key, cached)
            classes, keep = self._kept(record, video)
            if not keep.any():
                continue
            mask = torch.from_numpy(keep)
            n = int(keep.sum())
            feats.append(cached["features"][mask])
            stats.append(cached["frame_stats"][mask])
            labels.append(torch.from_numpy(classes[keep]))
            vids.append(torch.full((n,), vid, dtype=torch.long))
            times.append(torch.from_numpy(video.frame_indices.astype(np.int64)[keep]))
            if video.landmarks is None:
                has_landmarks = False
            else:
                poses = video.poses[keep] if video.poses is not None else None
                descs.append(_descriptors(video.landmarks[keep], poses))
        if not feats:
            raise ValueError("none of these videos has usable face frames")
        return FrameSet(
            torch.cat(feats),
            torch.cat(stats),
            torch.cat(labels),
            torch.cat(vids),
            torch.cat(times),
            np.concatenate(descs) if has_landmarks and descs else None,
        )


def _descriptors(landmarks: np.ndarray, poses: np.ndarray | None) -> np.ndarray:
    rows = []
    for k, points in enumerate(landmarks):
        pose = None if poses is None or np.isnan(poses[k]).any() else poses[k]
        if np.isnan(points).any():
            rows.append(np.full(136 + (3 if pose is not None else 0), np.nan))
            continue
        try:
            rows.append(geometry_descriptor(points, pose))
        except ValueError:
            rows.append(np.full(136 + (3 if pose is not None else 0), np.nan))
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=np.nan) for r in rows])
