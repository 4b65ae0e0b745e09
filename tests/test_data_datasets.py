"""Dataset loaders on tiny trees of real mp4s, one per layout (docs/datasets.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_media import gradient_frames, write_video

from pft.core.data.datasets import load_dataset
from pft.core.data.video import VideoConfig, decode_video
from pft.core.errors import DatasetLayoutError


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_video(tmp_path_factory.mktemp("clip") / "c.mp4", gradient_frames(4, 16, 16)).read_bytes()


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_synthetic_reads_the_manifest_with_roles(tmp_path: Path, clip: bytes) -> None:
    videos = []
    for subject, role in (("s000", "source"), ("t000", "target")):
        for label, split in (("neutral", "train" if role == "source" else "adapt"), ("pain", "eval")):
            rel = f"{subject}/{label}/{split}_0.mp4"
            _put(tmp_path / rel, clip)
            videos.append({"path": rel, "subject": subject, "label": label, "split": split, "frames": 4})
    manifest = {
        "classes": ["neutral", "pain"],
        "subjects": [{"id": "s000", "role": "source"}, {"id": "t000", "role": "target"}],
        "videos": videos,
        "profile": "biovid",
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    index = load_dataset(tmp_path, "synthetic")
    assert index.classes == ("neutral", "pain")
    assert index.subjects() == ["s000", "t000"]
    assert [r.split for r in index.filter(role="target").records] == ["adapt", "eval"]
    assert len(index.filter(split="adapt").records) == 1
    assert all(r.path.is_file() for r in index.records)
    assert len(decode_video(index.records[0].path, VideoConfig(isolate=False)).frames) == 4


def test_generic_layout(tmp_path: Path, clip: bytes) -> None:
    _put(tmp_path / "alice" / "happy" / "a.mp4", clip)
    _put(tmp_path / "alice" / "neutral" / "b.mp4", clip)
    _put(tmp_path / "bob" / "neutral" / "c.mp4", clip)
    (tmp_path / "bob" / "neutral" / "notes.txt").write_text("ignored")
    index = load_dataset(tmp_path, "generic")
    assert index.classes == ("happy", "neutral")
    assert {s: [r.label for r in rs] for s, rs in index.by_subject().items()} == {
        "alice": ["happy", "neutral"],
        "bob": ["neutral"],
    }


def test_biovid_part_a(tmp_path: Path, clip: bytes) -> None:
    subject = "071309_w_21"
    for level in ("BL1", "PA1", "PA2", "PA3", "PA4"):
        _put(tmp_path / "video" / subject / f"{subject}-{level}-001.mp4", clip)
    index = load_dataset(tmp_path, "biovid")
    assert sorted((r.path.name.split("-")[1], r.label) for r in index.records) == [
        ("BL1", "neutral"),
        ("PA4", "pain"),
    ]
    wide = load_dataset(tmp_path, "biovid", pain_levels=("PA3", "PA4"))
    assert sorted(str(r.label) for r in wide.records) == ["neutral", "pain", "pain"]
    assert wide.subjects() == [subject]
    with pytest.raises(DatasetLayoutError, match="pain_levels"):
        load_dataset(tmp_path, "biovid", pain_levels=("BL1",))


def test_stressid(tmp_path: Path, clip: bytes) -> None:
    for task in ("Breathing", "Math", "Baseline"):
        _put(tmp_path / "Videos" / "2ea4" / f"2ea4_{task}.mp4", clip)
    (tmp_path / "labels.csv").write_text(
        "subject/task,binary-stress,affect3-class\n2ea4_Breathing,0,0\n2ea4_Math,1,2\n"
    )
    index = load_dataset(tmp_path, "stressid")
    labels = {r.path.stem: r.label for r in index.records}
    assert labels == {"2ea4_Baseline": None, "2ea4_Breathing": "neutral", "2ea4_Math": "stress"}
    assert index.subjects() == ["2ea4"]


def test_bah(tmp_path: Path, clip: bytes) -> None:
    a = "Videos/82725/Visite_1/82725_Question_1_2024-11-19_15-12-23_Video.mp4"
    b = "Videos/82725/Visite_1/82725_Question_7_2024-11-19_15-20-01_Video.mp4"
    c = "Videos/82904/Visite_1/82904_Question_7_2025-02-27_09-27-57_Video.mp4"
    for rel in (a, b, c):
        _put(tmp_path / rel, clip)
    splits = tmp_path / "dataset-splits" / "video-level" / "BAH_DB" / "split-0"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text(
        f"{a},0,I get ready, shower, then go.\n{c},1,Well, I should have, but.\n"
    )
    (splits / "test.txt").write_text(f"{b},1,Hmm, maybe.\n")
    index = load_dataset(tmp_path, "bah")
    got = {r.path.name[:16]: (r.subject, r.label, r.split) for r in index.records}
    assert got == {
        "82725_Question_1": ("82725", "neutral", "train"),
        "82725_Question_7": ("82725", "ambivalence", "test"),
        "82904_Question_7": ("82904", "ambivalence", "train"),
    }


def test_affwild2_per_frame_labels(tmp_path: Path, clip: bytes) -> None:
    _put(tmp_path / "videos" / "118-30-640x480.mp4", clip)
    _put(tmp_path / "videos" / "10-60-1280x720.avi", clip)
    header = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
    train = tmp_path / "annotations" / "EXPR_Set" / "Train_Set"
    val = tmp_path / "annotations" / "EXPR_Set" / "Validation_Set"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    (train / "118-30-640x480.txt").write_text(f"{header}\n0\n4\n-1\n7\n")
    (val / "10-60-1280x720_left.txt").write_text(f"{header}\n1\n1\n6\n5\n")
    (val / "10-60-1280x720_right.txt").write_text(f"{header}\n2\n3\n0\n0\n")
    index = load_dataset(tmp_path, "affwild2")
    by = {r.subject: r for r in index.records}
    assert by["118-30-640x480"].frame_labels == ("neutral", "happiness", None, "other")
    assert by["118-30-640x480"].split == "train"
    assert by["10-60-1280x720_left"].path == by["10-60-1280x720_right"].path  # one video, two people
    assert by["10-60-1280x720_right"].frame_labels == ("disgust", "fear", "neutral", "neutral")
    assert by["10-60-1280x720_left"].split == "val" and by["10-60-1280x720_left"].label is None
    no_other = load_dataset(tmp_path, "affwild2", include_other=False)
    assert {r.subject: r for r in no_other.records}["118-30-640x480"].frame_labels == (
        "neutral",
        "happiness",
        None,
        None,
    )
    (train / "bad.txt").write_text("Happy,Sad\n1\n")
    _put(tmp_path / "videos" / "bad.mp4", clip)
    with pytest.raises(DatasetLayoutError, match=r"bad\.txt"):
        load_dataset(tmp_path, "affwild2")


def test_wrong_layout_gives_a_helpful_error(tmp_path: Path, clip: bytes) -> None:
    _put(tmp_path / "alice" / "happy" / "a.mp4", clip)
    with pytest.raises(DatasetLayoutError, match=r"unknown layout 'biovids'.*biovid"):
        load_dataset(tmp_path, "biovids")
    with pytest.raises(DatasetLayoutError, match=r"biovid.*'video' folder"):
        load_dataset(tmp_path, "biovid")
    with pytest.raises(DatasetLayoutError, match=r"manifest.json not found"):
        load_dataset(tmp_path, "synthetic")
    with pytest.raises(DatasetLayoutError, match=r"bad loader option"):
        load_dataset(tmp_path, "generic", pain_levels=("PA4",))
    with pytest.raises(DatasetLayoutError, match=r"not a folder"):
        load_dataset(tmp_path / "missing", "generic")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="no videos found"):
        load_dataset(empty, "generic")
