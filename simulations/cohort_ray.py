"""``pft cohort make --ray-address``: the cohort's subjects rendered as Ray tasks.

Each subject is rendered and encoded on a worker (:func:`pft.core.cohort.generate.render_subject`:
nothing written there), and its files come back through Ray's object store to this process,
which writes them into the cohort folder as they arrive and the manifest at the end. So the
nodes share nothing but the installed ``pft``: the cohort folder need only exist here. The
manifest is the in-process one (each subject draws from its own seeded streams), byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pft.core.cohort.config import CohortConfig
from pft.core.cohort.generate import (
    config_from_payload,
    render_subject,
    worker_payload,
    write_manifest,
    write_subject_files,
)
from pft.core.cohort.manifest import CohortManifest, SubjectInfo, VideoEntry
from pft.simulations.cluster import PieceReport, ray_session, run_tasks

__all__ = ["make_cohort_on_ray"]


def render_on_worker(
    payload: dict[str, Any], index: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, bytes]]:
    """One subject on a Ray worker: its manifest rows (as dicts) and its files."""
    info, entries, files = render_subject(config_from_payload(payload), index)
    return info.model_dump(), [e.model_dump() for e in entries], files


def make_cohort_on_ray(
    config: CohortConfig,
    out_dir: Path,
    address: str,
    progress: Callable[[int, int], None] | None = None,
    report: Callable[[PieceReport], None] | None = None,
) -> CohortManifest:
    """:func:`pft.core.cohort.make_cohort` with every subject a Ray task on ``address``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = config.n_source + config.n_target
    payload = worker_payload(config)
    infos: dict[int, SubjectInfo] = {}
    videos: dict[int, list[VideoEntry]] = {}

    def arrived(index: int, out: tuple[dict[str, Any], list[dict[str, Any]], dict[str, bytes]]) -> None:
        info, entries, files = out
        write_subject_files(out_dir, files)
        infos[index] = SubjectInfo.model_validate(info)
        videos[index] = [VideoEntry.model_validate(e) for e in entries]

    def step(done: int, count: int, piece: PieceReport) -> None:
        if progress is not None:
            progress(done, count)
        if report is not None:
            report(piece)

    if progress is not None:
        progress(0, total)
    with ray_session(address):
        run_tasks(
            render_on_worker, [(payload, k) for k in range(total)], total=total, progress=step, each=arrived
        )
    return write_manifest(config, out_dir, infos, videos)
