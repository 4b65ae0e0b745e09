"""The experiment's split of a real dataset: subjects into source and target, a target's videos into
neutral enrollment (``adapt``), labelled ``oracle`` and held-out ``eval``.

:func:`split_dataset` turns the :class:`~pft.core.data.DatasetIndex` of any layout into the same
kind of index the synthetic cohort has (``roles`` and ``train``/``adapt``/``oracle``/``eval``
splits), so ``pft simulate --data ROOT --layout L`` runs the identical pipeline. The rule, with
``rng = numpy.random.default_rng(seed)`` and every list sorted before it is shuffled (so the
split depends only on the file names, the labels and the seed):

1. Records without a class are dropped. A per-frame labelled video (``affwild2``) becomes one
   record per run of at least ``min_segment_frames`` consecutive frames with the same class
   (its ``frame_labels`` keep that run only, ``label`` is the run's class), so the segments of
   one person's video are split like videos. The classes are reordered with ``neutral_class``
   first (the experiment's convention).
2. A subject can be a target when it has at least 2 neutral videos and 1 other video (one
   neutral video to enroll on, one to evaluate, and an expression). The eligible subjects are
   shuffled; the first ``target_subjects`` (default: ``round(target_fraction * subjects)``, at
   least 1, leaving at least 2 sources) become targets, every other subject is a source (split
   ``train``).
3. A target's neutral videos are shuffled; the first ``max(1, floor(adapt_share * n))`` (never
   all of them) are ``adapt``. Its remaining videos are shuffled per class; ``floor(oracle_share
   * n_class)`` of each class go to ``oracle``, the rest to ``eval``, which keeps at least one
   video of every class. ``eval`` is never used for adaptation.

A split file (JSON) overrides the rule where it speaks::

    {"roles": {"<subject>": "source" | "target", ...},
     "videos": {"<path relative to the root>": "train" | "adapt" | "oracle" | "eval", ...}}

Subjects and videos it does not name follow the rule; so do videos that their layout already
marks (the ``generic`` layout's ``adapt_*`` / ``oracle_*`` / ``eval_*`` / ``train_*`` names).
A ``adapt`` video must be neutral and belong to a target.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from pydantic import Field

from pft.core.config import FrozenConfig
from pft.core.data.datasets import DatasetIndex, VideoRecord, load_dataset
from pft.core.errors import DatasetLayoutError

SPLITS = ("train", "adapt", "oracle", "eval")
TARGET_SPLITS = ("adapt", "oracle", "eval")


class SplitConfig(FrozenConfig):
    """The seeded split rule (see the module docstring).

    Attributes
    ----------
    seed:
        Seeds the shuffles.
    target_subjects:
        How many targets (``None``: ``round(target_fraction * subjects)``).
    target_fraction:
        Share of the subjects that become targets when ``target_subjects`` is ``None``.
    adapt_share:
        Share of a target's neutral videos used for enrollment (at least one, never all).
    oracle_share:
        Share of each class of a target's remaining videos given to ``oracle``.
    neutral_class:
        The class enrollment videos show.
    min_segment_frames:
        Shortest run of one class that becomes a segment of a per-frame labelled video.
    """

    seed: int = Field(0, ge=0)
    target_subjects: int | None = Field(None, ge=1)
    target_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    adapt_share: float = Field(0.5, gt=0.0, le=1.0)
    oracle_share: float = Field(0.25, ge=0.0, lt=1.0)
    neutral_class: str = "neutral"
    min_segment_frames: int = Field(8, ge=1)


def segments(record: VideoRecord, min_frames: int) -> list[VideoRecord]:
    """A per-frame labelled record as one record per run of >= ``min_frames`` frames of one class."""
    labels = record.frame_labels or ()
    out: list[VideoRecord] = []
    start = 0
    for end in range(1, len(labels) + 1):
        if end < len(labels) and labels[end] == labels[start]:
            continue
        label = labels[start]
        if label is not None and end - start >= min_frames:
            masked = tuple(label if start <= i < end else None for i in range(len(labels)))
            out.append(record.model_copy(update={"label": label, "frame_labels": masked}))
        start = end
    return out


def _video_label(record: VideoRecord) -> str | None:
    if record.label is not None or record.frame_labels is None:
        return record.label
    counts = Counter(x for x in record.frame_labels if x is not None)
    if not counts:
        return None
    best = max(counts.values())
    return sorted(k for k, v in counts.items() if v == best)[0]


def read_split_file(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(roles, videos)`` of a split file.

    Raises
    ------
    DatasetLayoutError
        Not JSON of the documented shape, or an unknown role or split name.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"split file {path}: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"roles", "videos"}:
        raise DatasetLayoutError(f"split file {path}: expected an object with 'roles' and/or 'videos'")
    roles = data.get("roles", {})
    videos = data.get("videos", {})
    if not isinstance(roles, dict) or not isinstance(videos, dict):
        raise DatasetLayoutError(f"split file {path}: 'roles' and 'videos' must be objects")
    bad_roles = sorted(str(v) for v in roles.values() if v not in ("source", "target"))
    bad_splits = sorted(str(v) for v in videos.values() if v not in SPLITS)
    if bad_roles or bad_splits:
        raise DatasetLayoutError(
            f"split file {path}: roles must be source/target, splits one of {SPLITS}; "
            f"got {bad_roles + bad_splits}"
        )
    return {str(k): str(v) for k, v in roles.items()}, {str(k): str(v) for k, v in videos.items()}


def split_dataset(
    index: DatasetIndex, config: SplitConfig | None = None, split_file: str | Path | None = None
) -> DatasetIndex:
    """The index with roles and experiment splits (see the module docstring).

    Raises
    ------
    DatasetLayoutError
        No neutral class, fewer than 2 sources or no target possible, or a split file that names
        unknown subjects or videos or puts a non-neutral video into ``adapt``.
    """
    config = config or SplitConfig()
    neutral = config.neutral_class
    if neutral not in index.classes:
        raise DatasetLayoutError(
            f"{index.layout}: no {neutral!r} class among {list(index.classes)}; "
            "enrollment needs neutral videos"
        )
    fixed_roles, fixed_videos = read_split_file(split_file) if split_file is not None else ({}, {})
    records: list[VideoRecord] = []
    expanded: list[VideoRecord] = []
    for record in index.records:
        if record.label is None and record.frame_labels is not None:
            expanded += segments(record, config.min_segment_frames)
        else:
            expanded.append(record)
    for record in expanded:
        label = _video_label(record)
        if label is None or label not in index.classes:
            continue
        premarked = record.split if record.split in SPLITS else None
        records.append(record.model_copy(update={"label": label, "split": premarked}))
    by_path = {_relative(r.path, index.root): r for r in records}  # (segments share their path)
    unknown = sorted(set(fixed_videos) - set(by_path))
    subjects = sorted({r.subject for r in records})
    unknown += sorted(set(fixed_roles) - set(subjects))
    if unknown:
        raise DatasetLayoutError(f"split file names what the dataset does not have: {unknown[:5]}")
    rng = np.random.default_rng(config.seed)
    groups: dict[str, list[VideoRecord]] = {s: [] for s in subjects}
    for record in records:
        path = _relative(record.path, index.root)
        split = fixed_videos.get(path, record.split)
        groups[record.subject].append(record.model_copy(update={"split": split}))
    roles = _roles(groups, fixed_roles, config, rng, neutral)
    out: list[VideoRecord] = []
    for subject in subjects:
        recs = groups[subject]
        if roles[subject] == "source":
            out += [r.model_copy(update={"split": "train"}) for r in recs]
            continue
        out += _target_splits(subject, recs, config, rng, neutral)
    classes = (neutral, *sorted(c for c in index.classes if c != neutral))
    return index.model_copy(update={"records": tuple(out), "roles": roles, "classes": classes})


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _eligible(recs: list[VideoRecord], neutral: str) -> bool:
    n_neutral = sum(r.label == neutral for r in recs)
    return n_neutral >= 2 and len(recs) > n_neutral


def _roles(
    groups: dict[str, list[VideoRecord]],
    fixed: dict[str, str],
    config: SplitConfig,
    rng: np.random.Generator,
    neutral: str,
) -> dict[str, str]:
    subjects = sorted(groups)
    roles = dict(fixed)
    for s in subjects:  # a video marked adapt/oracle/eval makes its subject a target
        if s not in roles and any(r.split in TARGET_SPLITS for r in groups[s]):
            roles[s] = "target"
    free = [s for s in subjects if s not in roles]
    wanted = config.target_subjects or max(1, round(config.target_fraction * len(subjects)))
    wanted = min(wanted, len(subjects) - 2)
    eligible = [s for s in free if _eligible(groups[s], neutral)]
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    have = sum(1 for r in roles.values() if r == "target")
    for s in order[: max(0, wanted - have)]:
        roles[s] = "target"
    for s in free:
        roles.setdefault(s, "source")
    sources = [s for s in subjects if roles[s] == "source"]
    targets = [s for s in subjects if roles[s] == "target"]
    if len(sources) < 2 or not targets:
        raise DatasetLayoutError(
            f"the split needs at least 2 source subjects and 1 target, got {len(sources)} and "
            f"{len(targets)} of {len(subjects)} subjects (a target needs 2 neutral videos and 1 other)"
        )
    return {s: roles[s] for s in subjects}


def _target_splits(
    subject: str, recs: list[VideoRecord], config: SplitConfig, rng: np.random.Generator, neutral: str
) -> list[VideoRecord]:
    for r in recs:
        if r.split == "adapt" and r.label != neutral:
            raise DatasetLayoutError(f"{r.path}: marked for enrollment (adapt) but labelled {r.label!r}")
    marked = [r for r in recs if r.split in TARGET_SPLITS]
    free = sorted((r for r in recs if r.split not in TARGET_SPLITS), key=lambda r: r.path.as_posix())
    out = list(marked)
    has_adapt = any(r.split == "adapt" for r in marked)
    neutral_free = [r for r in free if r.label == neutral]
    rest = [r for r in free if r.label != neutral]
    if not has_adapt:
        if not neutral_free:
            raise DatasetLayoutError(f"target {subject!r} has no neutral video to enroll on")
        shuffled = [neutral_free[i] for i in rng.permutation(len(neutral_free))]
        n_adapt = max(1, math.floor(config.adapt_share * len(shuffled)))
        if n_adapt == len(shuffled) and len(shuffled) > 1:
            n_adapt -= 1
        out += [r.model_copy(update={"split": "adapt"}) for r in shuffled[:n_adapt]]
        rest += shuffled[n_adapt:]
    else:
        rest += neutral_free
    by_class: dict[str, list[VideoRecord]] = {}
    for r in sorted(rest, key=lambda r: r.path.as_posix()):
        by_class.setdefault(str(r.label), []).append(r)
    for label in sorted(by_class):
        group = by_class[label]
        group = [group[i] for i in rng.permutation(len(group))]
        n_oracle = math.floor(config.oracle_share * len(group)) if len(group) > 1 else 0
        out += [r.model_copy(update={"split": "oracle"}) for r in group[:n_oracle]]
        out += [r.model_copy(update={"split": "eval"}) for r in group[n_oracle:]]
    return out


class DataSource(FrozenConfig):
    """A real dataset folder for the experiment (``pft simulate --data ROOT --layout L``).

    Attributes
    ----------
    root:
        The dataset folder.
    layout:
        Its loader: ``generic``, ``biovid``, ``stressid``, ``bah``, ``affwild2``.
    split_file:
        Optional split file (see the module docstring).
    split:
        The seeded rule (its seed is the experiment's).
    detector:
        Face detector for its videos (``pft.core.data.detectors.make_detector``; ``auto`` = dlib
        HOG with 68-point landmarks, or Haar without the ``landmarks`` extra).
    """

    root: Path
    layout: str
    split_file: Path | None = None
    split: SplitConfig = SplitConfig()
    detector: str = "auto"

    def with_seed(self, seed: int) -> DataSource:
        """This source with the split rule's seed set (the experiment's seed)."""
        return self.model_copy(update={"split": self.split.model_copy(update={"seed": seed})})


def open_data_source(source: DataSource) -> DatasetIndex:
    """The split index of a dataset folder (:func:`load_dataset` then :func:`split_dataset`)."""
    return split_dataset(load_dataset(source.root, source.layout), source.split, source.split_file)
