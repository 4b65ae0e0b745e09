"""A contact sheet of a cohort: rows are subjects, columns are classes, each cell an apex frame."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

from pft.core.cohort.manifest import Split, VideoEntry, load_manifest


def _apex_frame(cohort_dir: Path, entry: VideoEntry) -> np.ndarray:
    sidecar = json.loads((cohort_dir / entry.sidecar).read_text())
    levels = [f["intensity"] for f in sidecar["frames"]]
    target = int(np.argmax(levels)) if max(levels) > 0 else len(levels) // 2
    with av.open(str(cohort_dir / entry.path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == target:
                return frame.to_ndarray(format="rgb24")
    raise ValueError(f"{entry.path}: fewer frames than its sidecar lists")


def preview_cohort(cohort_dir: Path, out_png: Path, subjects: int = 8) -> Path:
    """Draw a labelled contact sheet (subjects x classes, apex frames) of a cohort.

    Parameters
    ----------
    cohort_dir:
        A folder made by :func:`pft.core.cohort.make_cohort`.
    out_png:
        Where to write the PNG.
    subjects:
        How many subjects (rows), spread evenly over the cohort.

    Returns
    -------
    Path
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort_dir, out_png = Path(cohort_dir), Path(out_png)
    manifest = load_manifest(cohort_dir)
    pool = manifest.subjects
    picks = np.unique(np.linspace(0, len(pool) - 1, min(subjects, len(pool))).round().astype(int))
    rows = [pool[i] for i in picks]
    n_cls = len(manifest.classes)
    fig, axes = plt.subplots(
        len(rows), n_cls, figsize=(1.6 * n_cls + 0.8, 1.6 * len(rows) + 0.4), squeeze=False
    )
    for r, subject in enumerate(rows):
        split: Split = "train" if subject.role == "source" else "eval"
        for c, name in enumerate(manifest.classes):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            clips = manifest.videos_of(subject=subject.id, split=split, label=name)
            if clips:
                ax.imshow(_apex_frame(cohort_dir, clips[0]))
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                lean = ", leans" if subject.resting_leans else ""
                traits = f"{subject.age_group}, expr {subject.expressiveness:.2f}{lean}"
                ax.set_ylabel(
                    f"{subject.id} ({subject.role})\n{traits}",
                    fontsize=7,
                )
    fig.suptitle(f"cohort {manifest.profile} (seed {manifest.seed}): apex frames", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
