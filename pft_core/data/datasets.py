"""Dataset loaders: one :class:`DatasetIndex` of :class:`VideoRecord` per folder layout.

Layouts (documented exactly in ``docs/datasets.md``): ``synthetic`` (the cohort's manifest),
``generic`` (``<root>/<subject>/<class>/<video>``), ``biovid`` (BioVid Heat Pain part A),
``stressid``, ``bah`` and ``affwild2`` (Aff-Wild2 EXPR). All go through :func:`load_dataset`.
Other layouts are added from outside the package with :func:`register_layout` or the
``pft.layouts`` entry-point group (docs/extending.md).
"""

from __future__ import annotations

import csv
import inspect
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pft.core.errors import DatasetLayoutError
from pft.core.plugins import LAYOUTS_GROUP, PluginError, check_name, load_entry_points

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class VideoRecord(BaseModel):
    """One video of a dataset.

    Attributes
    ----------
    path:
        Absolute path of the video file.
    subject:
        Who is filmed (the unit of personalisation).
    label:
        Video-level class name (``None`` when unlabelled or labelled per frame).
    split:
        Dataset split (e.g. ``train``/``adapt``/``oracle``/``eval`` for the cohort; ``train``/``val``
        for datasets with an official split), or ``None``.
    frame_labels:
        Per-frame class names in decode order (``None`` = that frame is unannotated), for datasets
        annotated per frame; ``None`` otherwise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    subject: str
    label: str | None = None
    split: str | None = None
    frame_labels: tuple[str | None, ...] | None = None


class DatasetIndex(BaseModel):
    """The videos of one dataset, with its class names and (for the cohort) subject roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layout: str
    root: Path
    classes: tuple[str, ...]
    records: tuple[VideoRecord, ...]
    roles: dict[str, str] = {}
    """Subject id -> ``source``/``target`` (the synthetic cohort says; real layouts leave it empty)."""

    def subjects(self) -> list[str]:
        """Subject ids, sorted."""
        return sorted({r.subject for r in self.records})

    def by_subject(self) -> dict[str, list[VideoRecord]]:
        """Records grouped by subject (subjects sorted, records in index order)."""
        groups: dict[str, list[VideoRecord]] = {s: [] for s in self.subjects()}
        for record in self.records:
            groups[record.subject].append(record)
        return groups

    def filter(
        self,
        *,
        split: str | Iterable[str] | None = None,
        role: str | None = None,
        label: str | None = None,
        subjects: Iterable[str] | None = None,
    ) -> DatasetIndex:
        """A new index with only the records that match every given criterion."""
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        wanted = set(subjects) if subjects is not None else None
        if role is not None and not self.roles:
            raise DatasetLayoutError(f"layout {self.layout!r} has no subject roles to filter by")
        kept = tuple(
            r
            for r in self.records
            if (splits is None or r.split in splits)
            and (role is None or self.roles.get(r.subject) == role)
            and (label is None or r.label == label)
            and (wanted is None or r.subject in wanted)
        )
        return self.model_copy(update={"records": kept})


def _require_dir(path: Path, layout: str, what: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{layout}: expected {what} at {path}, which is not a folder; see docs/datasets.md"
        )


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _finish(
    layout: str, root: Path, records: list[VideoRecord], classes: Iterable[str], **kw: Any
) -> DatasetIndex:
    if not records:
        raise DatasetLayoutError(
            f"{layout}: no videos found under {root} in the expected layout; see docs/datasets.md"
        )
    return DatasetIndex(layout=layout, root=root, classes=tuple(classes), records=tuple(records), **kw)


# --- synthetic cohort --------------------------------------------------------------------------
class _ManifestVideo(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str
    subject: str
    label: str
    split: str


class _ManifestSubject(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    role: Literal["source", "target"]


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    classes: list[str]
    subjects: list[_ManifestSubject]
    videos: list[_ManifestVideo]


def load_synthetic(root: Path) -> DatasetIndex:
    """The synthetic cohort: ``<root>/manifest.json`` lists every video with subject, label, split."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise DatasetLayoutError(f"synthetic: {manifest_path} not found (make one with `pft cohort make`)")
    try:
        manifest = _Manifest.model_validate(json.loads(manifest_path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise DatasetLayoutError(f"synthetic: {manifest_path} is not a cohort manifest: {exc}") from None
    records = [
        VideoRecord(path=root / v.path, subject=v.subject, label=v.label, split=v.split)
        for v in manifest.videos
    ]
    roles = {s.id: s.role for s in manifest.subjects}
    return _finish("synthetic", root, records, manifest.classes, roles=roles)


# --- generic -----------------------------------------------------------------------------------
#: A generic video named ``<split>_<anything>`` is marked for that split (as the cohort names its
#: files); ``adapt_*`` marks a neutral enrollment video.
GENERIC_SPLIT_PREFIXES = ("adapt", "oracle", "eval", "train")


def _generic_split(name: str) -> str | None:
    prefix, sep, _rest = name.partition("_")
    return prefix if sep and prefix in GENERIC_SPLIT_PREFIXES else None


def load_generic(root: Path, neutral_class: str = "neutral") -> DatasetIndex:
    """``<root>/<subject>/<class>/<video>``: any folder of labelled videos per person.

    A file named ``adapt_<anything>`` (``oracle_``, ``eval_``, ``train_``) is marked for that
    split: ``<subject>/neutral/adapt_*.mp4`` are the person's enrollment videos (the deployment
    ClientApp and ``pft simulate --data`` use them). An ``adapt_`` video outside the
    ``neutral_class`` folder is a layout error.
    """
    records: list[VideoRecord] = []
    classes: set[str] = set()
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for class_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            for video in _videos(class_dir):
                classes.add(class_dir.name)
                split = _generic_split(video.name)
                if split == "adapt" and class_dir.name != neutral_class:
                    raise DatasetLayoutError(
                        f"generic: {video} is marked for enrollment (adapt_) but is not in a "
                        f"'{neutral_class}' folder; enrollment videos show a neutral face"
                    )
                records.append(
                    VideoRecord(path=video, subject=subject_dir.name, label=class_dir.name, split=split)
                )
    return _finish("generic", root, records, sorted(classes))


# --- BioVid Heat Pain Database, part A ---------------------------------------------------------
BIOVID_LEVELS = ("BL1", "PA1", "PA2", "PA3", "PA4")
_BIOVID_NAME = re.compile(r"^(?P<subject>.+)-(?P<level>BL1|PA1|PA2|PA3|PA4)-(?P<n>\d+)$")


def load_biovid(
    root: Path, pain_levels: Iterable[str] = ("PA4",), keep_other_levels: bool = False
) -> DatasetIndex:
    """BioVid part A: ``<root>/video/<subject>/<subject>-<BL1|PA1..PA4>-<nnn>.mp4``.

    ``BL1`` (baseline, no pain) is ``neutral``; the levels in ``pain_levels`` are ``pain``
    (default ``PA4`` only: the usual binary BL1-vs-PA4 protocol). Videos of the remaining levels
    are dropped unless ``keep_other_levels``, which keeps them unlabelled.
    """
    pain = set(pain_levels)
    if not pain or not pain <= set(BIOVID_LEVELS[1:]):
        raise DatasetLayoutError(f"biovid: pain_levels must be a non-empty subset of {BIOVID_LEVELS[1:]}")
    video_root = root / "video"
    _require_dir(video_root, "biovid", "the 'video' folder")
    records: list[VideoRecord] = []
    for subject_dir in sorted(p for p in video_root.iterdir() if p.is_dir()):
        for video in _videos(subject_dir):
            match = _BIOVID_NAME.match(video.stem)
            if not match:
                continue
            level = match["level"]
            label = "neutral" if level == "BL1" else "pain" if level in pain else None
            if label is None and not keep_other_levels:
                continue
            records.append(VideoRecord(path=video, subject=subject_dir.name, label=label))
    return _finish("biovid", root, records, ("neutral", "pain"))


# --- StressID ----------------------------------------------------------------------------------
def load_stressid(root: Path, label_column: str = "binary-stress") -> DatasetIndex:
    """StressID: ``<root>/Videos/<subject>/<subject>_<task>.mp4`` + ``<root>/labels.csv``.

    ``labels.csv`` has a ``subject/task`` column (``<subject>_<task>``) and the label columns of the
    release; ``label_column`` (default ``binary-stress``: 0 = ``neutral``, 1 = ``stress``) is used.
    Videos without a row (e.g. the ``Baseline`` recording) are kept unlabelled.
    """
    video_root = root / "Videos"
    _require_dir(video_root, "stressid", "the 'Videos' folder")
    labels_path = root / "labels.csv"
    if not labels_path.is_file():
        raise DatasetLayoutError(f"stressid: {labels_path} not found; see docs/datasets.md")
    names = {"0": "neutral", "1": "stress"} if label_column == "binary-stress" else None
    labels: dict[str, str] = {}
    with labels_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if (
            reader.fieldnames is None
            or "subject/task" not in reader.fieldnames
            or label_column not in reader.fieldnames
        ):
            raise DatasetLayoutError(
                f"stressid: {labels_path} needs columns 'subject/task' and {label_column!r}, "
                f"has {reader.fieldnames}"
            )
        for row in reader:
            value = (row[label_column] or "").strip()
            if value in ("", "nan", "NaN"):
                continue
            value = value[:-2] if value.endswith(".0") else value
            labels[row["subject/task"].strip()] = names.get(value, value) if names else value
    records: list[VideoRecord] = []
    for subject_dir in sorted(p for p in video_root.iterdir() if p.is_dir()):
        for video in _videos(subject_dir):
            records.append(VideoRecord(path=video, subject=subject_dir.name, label=labels.get(video.stem)))
    classes = ("neutral", "stress") if names else sorted(set(labels.values()))
    return _finish("stressid", root, records, classes)


# --- BAH (Behavioural Ambivalence/Hesitancy) ---------------------------------------------------
BAH_SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


def load_bah(root: Path, splits_dir: str | Path | None = None) -> DatasetIndex:
    """BAH: ``<root>/Videos/<participant>/<visit>/<participant>_Question_<q>_..._Video.mp4``.

    Labels come from the release's video-level split lists (``train.txt``, ``val.txt``,
    ``test.txt``; lines ``Videos/<...>.mp4,<0|1>,<transcript>``, 0 = no A/H = ``neutral``,
    1 = with A/H = ``ambivalence``), looked for in ``splits_dir``, else
    ``<root>/dataset-splits/video-level/BAH_DB/split-0``, else ``<root>/splits``. Videos in no
    list are kept unlabelled.
    """
    video_root = root / "Videos"
    _require_dir(video_root, "bah", "the 'Videos' folder")
    candidates = (
        [Path(splits_dir)]
        if splits_dir is not None
        else [root / "dataset-splits" / "video-level" / "BAH_DB" / "split-0", root / "splits"]
    )
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise DatasetLayoutError(f"bah: no split lists found in {[str(c) for c in candidates]}")
    labelled: dict[Path, tuple[str | None, str | None]] = {}
    for split, name in BAH_SPLIT_FILES.items():
        list_path = folder / name
        if not list_path.is_file():
            continue
        for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split(",", 2)  # the transcript may itself hold commas
            if len(parts) < 2 or parts[1].strip() not in ("0", "1"):
                raise DatasetLayoutError(f"bah: {list_path}:{line_no}: expected '<video>,<0|1>,<text>'")
            label = "ambivalence" if parts[1].strip() == "1" else "neutral"
            labelled[(root / parts[0].strip()).resolve()] = (label, split)
    records: list[VideoRecord] = []
    for participant in sorted(p for p in video_root.iterdir() if p.is_dir()):
        for video in sorted(
            p for p in participant.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
        ):
            video_label, video_split = labelled.get(video.resolve(), (None, None))
            records.append(
                VideoRecord(path=video, subject=participant.name, label=video_label, split=video_split)
            )
    return _finish("bah", root, records, ("neutral", "ambivalence"))


# --- Aff-Wild2 (ABAW expression track) ---------------------------------------------------------
AFFWILD2_CLASSES = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise", "other")
AFFWILD2_SPLITS = {"Train_Set": "train", "Validation_Set": "val"}


def _affwild2_frame_labels(path: Path) -> tuple[str | None, ...]:
    lines = path.read_text().splitlines()
    header = [h.strip().lower() for h in lines[0].split(",")] if lines else []
    if header != list(AFFWILD2_CLASSES):
        raise DatasetLayoutError(
            f"affwild2: {path} must start with the header "
            "'Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other'"
        )
    out: list[str | None] = []
    for line_no, line in enumerate(lines[1:], start=2):
        try:
            value = int(line.strip())
        except ValueError:
            raise DatasetLayoutError(f"affwild2: {path}:{line_no}: expected an integer label") from None
        if not -1 <= value < len(AFFWILD2_CLASSES):
            raise DatasetLayoutError(f"affwild2: {path}:{line_no}: label {value} out of range")
        out.append(None if value == -1 else AFFWILD2_CLASSES[value])
    return tuple(out)


def load_affwild2(root: Path, include_other: bool = True) -> DatasetIndex:
    """Aff-Wild2 EXPR: ``<root>/videos/<name>.(mp4|avi)`` + ``<root>/annotations/EXPR_Set/<split>/*.txt``.

    An annotation ``<name>.txt`` (``<split>`` is ``Train_Set`` or ``Validation_Set``) holds the
    class header then one integer per frame (-1 = unannotated). ``<name>_left``/``<name>_right``
    annotate the two people of video ``<name>``: the video file is ``<name>`` and each side is its
    own subject. ``include_other=False`` turns the ``Other`` class into unannotated frames.
    """
    video_root = root / "videos"
    annotation_root = root / "annotations" / "EXPR_Set"
    _require_dir(video_root, "affwild2", "the 'videos' folder")
    _require_dir(annotation_root, "affwild2", "'annotations/EXPR_Set'")
    videos: dict[str, Path] = {}
    for video in _videos(video_root):
        videos.setdefault(video.stem, video)
    records: list[VideoRecord] = []
    for folder_name, split in AFFWILD2_SPLITS.items():
        folder = annotation_root / folder_name
        if not folder.is_dir():
            continue
        for annotation in sorted(folder.glob("*.txt")):
            name = annotation.stem
            base = re.sub(r"_(left|right)$", "", name)
            match = videos.get(name) or videos.get(base)
            if match is None:
                continue
            labels = _affwild2_frame_labels(annotation)
            if not include_other:
                labels = tuple(None if x == "other" else x for x in labels)
            records.append(VideoRecord(path=match, subject=name, split=split, frame_labels=labels))
    classes = AFFWILD2_CLASSES if include_other else AFFWILD2_CLASSES[:-1]
    return _finish("affwild2", root, records, classes)


LOADERS: dict[str, Callable[..., DatasetIndex]] = {
    "synthetic": load_synthetic,
    "generic": load_generic,
    "biovid": load_biovid,
    "stressid": load_stressid,
    "bah": load_bah,
    "affwild2": load_affwild2,
}


#: the layouts that ship with the package (in the order of :data:`LOADERS`)
BUILTIN_LAYOUTS: tuple[str, ...] = tuple(LOADERS)

Loader = Callable[..., DatasetIndex]
"""``loader(root: Path, **options) -> DatasetIndex``: ``root`` is the resolved dataset folder."""


def register_layout(name: str, loader: Loader, *, replace: bool = False) -> None:
    """Add dataset layout ``name``: ``pft data --layout NAME`` and ``pft simulate --data ROOT
    --layout NAME`` then read a folder with ``loader`` (docs/extending.md).

    ``loader(root, **options)`` returns the folder's :class:`DatasetIndex` (its ``layout`` should
    be ``name``) and raises :class:`~pft.core.errors.DatasetLayoutError` for a folder it cannot
    read. A built-in name cannot be taken; another registered name only with ``replace=True``.
    """
    check_name("layout", name)
    if not callable(loader):
        raise PluginError(f"layout {name!r}: the loader {loader!r} is not callable")
    if name in BUILTIN_LAYOUTS:
        raise PluginError(f"layout name {name!r} is taken by the package")
    if name in LOADERS and LOADERS[name] is not loader and not replace:
        raise PluginError(f"layout {name!r} is already registered (pass replace=True to replace it)")
    LOADERS[name] = loader


def layout_names() -> tuple[str, ...]:
    """Every layout's name: the built-ins, then the registered ones (entry points read first)."""
    load_entry_points(LAYOUTS_GROUP, lambda name, obj: register_layout(name, obj))  # type: ignore[arg-type]
    return tuple(LOADERS)


def load_dataset(root: str | Path, layout: str, **options: Any) -> DatasetIndex:
    """Index the videos under ``root`` read with the named layout's loader.

    Parameters
    ----------
    root:
        The dataset folder.
    layout:
        One of ``synthetic``, ``generic``, ``biovid``, ``stressid``, ``bah``, ``affwild2``, or a
        registered layout (:func:`layout_names`).
    **options:
        Loader options (e.g. ``pain_levels`` for ``biovid``).

    Raises
    ------
    DatasetLayoutError
        Unknown layout, a missing folder or file, or no videos where the layout expects them.
    """
    root = Path(root).expanduser().resolve()
    if layout not in LOADERS and layout not in layout_names():  # entry points read for another name
        raise DatasetLayoutError(f"unknown layout {layout!r}; choose one of {sorted(LOADERS)}")
    if not root.is_dir():
        raise DatasetLayoutError(f"{layout}: dataset root {root} is not a folder")
    loader = LOADERS[layout]
    try:
        inspect.signature(loader).bind(root, **options)
    except TypeError as exc:
        raise DatasetLayoutError(f"{layout}: bad loader option ({exc})") from None
    index = loader(root, **options)
    if not isinstance(index, DatasetIndex):
        raise DatasetLayoutError(
            f"{layout}: the loader returned a {type(index).__name__}, not a DatasetIndex"
        )
    return index
