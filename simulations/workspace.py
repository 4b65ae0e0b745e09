"""Where an experiment's inputs come from: the cache root and the synthetic cohort, made once.

Caches live under one root the user can set (``--cache-dir``, else ``$PFT_CACHE_DIR``, else
``~/.cache/pft``): ``cohorts/<config hash>/`` (the synthetic videos), and the frame store's
``frames/`` and ``features/`` (:mod:`pft.core.frames`), so an experiment never renders a cohort,
decodes or embeds a frame twice.
"""

from __future__ import annotations

import os
from pathlib import Path

from pft.core.cohort import CohortConfig, make_cohort
from pft.core.data import DatasetIndex, load_dataset
from pft.core.data.split import DataSource, open_data_source
from pft.core.frames import Step

__all__ = ["default_cache_root", "ensure_cohort", "experiment_index", "open_cohort"]


def default_cache_root() -> Path:
    """``$PFT_CACHE_DIR`` if set, else ``~/.cache/pft``."""
    env = os.environ.get("PFT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pft"


def ensure_cohort(config: CohortConfig, cache_root: Path, progress: Step | None = None) -> Path:
    """The cohort for ``config``, made once under ``cache_root/cohorts/<hash>`` and then reused."""
    folder = cache_root / "cohorts" / f"{config.profile}-{config.config_hash()}"
    if not (folder / "manifest.json").is_file():
        make_cohort(config, folder, progress=progress)
    return folder


def open_cohort(folder: Path) -> DatasetIndex:
    """The dataset index of a synthetic cohort folder."""
    return load_dataset(folder, "synthetic")


def experiment_index(
    cohort: CohortConfig, data: DataSource | None, cache_root: Path, progress: Step | None = None
) -> DatasetIndex:
    """What an experiment runs on: the synthetic cohort, or a dataset folder split by
    :func:`pft.core.data.split.split_dataset` (``pft simulate --data``)."""
    if data is None:
        return open_cohort(ensure_cohort(cohort, cache_root, progress))
    return open_data_source(data)
