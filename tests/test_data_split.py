"""The experiment's split of a dataset folder: seeded, complete, never enrolling on eval videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pft.core.data import DatasetIndex, VideoRecord, load_dataset
from pft.core.data.split import SplitConfig, segments, split_dataset
from pft.core.errors import DatasetLayoutError

ROOT = Path("/data")


def _index(subjects: int = 6, neutral: int = 4, other: int = 3) -> DatasetIndex:
    records = []
    for s in range(subjects):
        for label, n in (("neutral", neutral), ("happy", other), ("sad", other)):
            for k in range(n):
                records.append(
                    VideoRecord(path=ROOT / f"s{s}" / label / f"v{k}.mp4", subject=f"s{s}", label=label)
                )
    return DatasetIndex(
        layout="generic", root=ROOT, classes=("happy", "neutral", "sad"), records=tuple(records)
    )


def _splits(index: DatasetIndex) -> dict[str, str | None]:
    return {r.path.as_posix(): r.split for r in index.records}


def test_split_is_seeded_complete_and_keeps_eval_out_of_enrollment() -> None:
    index = _index()
    a, b = split_dataset(index, SplitConfig(seed=1)), split_dataset(index, SplitConfig(seed=1))
    assert a == b  # same seed, same split
    others = [split_dataset(index, SplitConfig(seed=s)) for s in range(2, 8)]
    assert any(_splits(o) != _splits(a) or o.roles != a.roles for o in others)  # the seed matters
    assert a.classes == ("neutral", "happy", "sad")  # neutral first, the experiment's class 0
    assert len(a.records) == len(index.records)  # every labelled video once
    targets = [s for s, r in a.roles.items() if r == "target"]
    sources = [s for s, r in a.roles.items() if r == "source"]
    assert len(targets) == round(0.3 * 6) == 2 and len(sources) == 4
    for record in a.records:
        if a.roles[record.subject] == "source":
            assert record.split == "train"
        else:
            assert record.split in ("adapt", "oracle", "eval")
            if record.split == "adapt":
                assert record.label == "neutral"
    for t in targets:
        own = [r for r in a.records if r.subject == t]
        adapt = [r for r in own if r.split == "adapt"]
        # floor(0.5 * 4) = 2 enrollment videos; oracle floor(0.25 * n) of each other class; eval the rest
        assert len(adapt) == 2
        assert {r.label for r in own if r.split == "eval"} == {"neutral", "happy", "sad"}
        assert sum(r.split == "oracle" for r in own) == 0  # floor(0.25 * 2) = floor(0.25 * 3) = 0
    config = SplitConfig(seed=1, oracle_share=0.5)
    for t in (s for s, r in split_dataset(index, config).roles.items() if r == "target"):
        own = [r for r in split_dataset(index, config).records if r.subject == t]
        assert sum(r.split == "oracle" for r in own) == 1 + 1 + 1  # floor(0.5 * 2), floor(0.5 * 3) x 2


def test_split_file_overrides_roles_and_videos(tmp_path: Path) -> None:
    index = _index()
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps(
            {
                "roles": {"s0": "target", "s1": "source"},
                "videos": {"s0/neutral/v3.mp4": "adapt", "s0/happy/v0.mp4": "oracle"},
            }
        )
    )
    out = split_dataset(index, SplitConfig(seed=0, target_subjects=1), split_file)
    assert out.roles["s0"] == "target" and out.roles["s1"] == "source"
    assert sum(r == "target" for r in out.roles.values()) == 1  # the file's target counts towards 1
    splits = _splits(out)
    assert splits["/data/s0/neutral/v3.mp4"] == "adapt"
    assert splits["/data/s0/happy/v0.mp4"] == "oracle"
    # the file marked an adapt video: the others are not enrolled on
    assert [p for p, s in splits.items() if s == "adapt"] == ["/data/s0/neutral/v3.mp4"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"videos": {"s0/happy/v1.mp4": "adapt"}}))
    with pytest.raises(DatasetLayoutError, match="marked for enrollment"):
        split_dataset(index, SplitConfig(), bad)
    bad.write_text(json.dumps({"roles": {"nobody": "target"}}))
    with pytest.raises(DatasetLayoutError, match="does not have"):
        split_dataset(index, SplitConfig(), bad)


def test_too_few_subjects_is_a_clear_error() -> None:
    with pytest.raises(DatasetLayoutError, match="at least 2 source subjects and 1 target"):
        split_dataset(_index(subjects=2))
    with pytest.raises(DatasetLayoutError, match="no 'neutral' class"):
        split_dataset(_index().model_copy(update={"classes": ("happy", "sad")}))


def test_generic_layout_marks_enrollment_videos_by_name(tmp_path: Path) -> None:
    for subject in ("ann", "bob", "cid", "dan"):
        for name in ("neutral/a.mp4", "neutral/b.mp4", "neutral/c.mp4", "happy/d.mp4"):
            path = tmp_path / subject / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    (tmp_path / "ann" / "neutral" / "a.mp4").rename(tmp_path / "ann" / "neutral" / "adapt_a.mp4")
    index = load_dataset(tmp_path, "generic")
    assert {r.path.name: r.split for r in index.records if r.subject == "ann"}["adapt_a.mp4"] == "adapt"
    out = split_dataset(index, SplitConfig(target_subjects=1))
    assert [s for s, r in out.roles.items() if r == "target"] == ["ann"]  # marked: a target
    assert [r.path.name for r in out.records if r.split == "adapt"] == ["adapt_a.mp4"]
    (tmp_path / "ann" / "happy" / "adapt_2.mp4").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="not in a 'neutral' folder"):
        load_dataset(tmp_path, "generic")


def test_per_frame_labels_become_segments() -> None:
    labels = ("neutral",) * 9 + (None,) * 2 + ("happy",) * 8 + ("neutral",) * 3 + ("sad",) * 8
    record = VideoRecord(path=ROOT / "v.mp4", subject="v", frame_labels=labels)
    out = segments(record, min_frames=8)
    assert [r.label for r in out] == ["neutral", "happy", "sad"]  # the 3-frame neutral run is too short
    assert out[0].frame_labels == ("neutral",) * 9 + (None,) * (len(labels) - 9)
    assert out[1].frame_labels is not None and out[1].frame_labels[11:19] == ("happy",) * 8
    assert sum(x is not None for x in out[1].frame_labels) == 8
