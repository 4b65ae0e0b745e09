"""`pft cohort`: make, preview and inspect the synthetic face-video cohort."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pft.cli.extras import require_extra
from pft.core.errors import PFTError

cohort_app = typer.Typer(
    help="The synthetic face-video cohort: rendered faces as H.264 videos with ground-truth sidecars.",
    no_args_is_help=True,
)
_console = Console()


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@cohort_app.command("make")
def make(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort into.")],
    profile: Annotated[
        str, typer.Option(help="biovid, stressid, bah, affwild2 or a registered profile (docs/extending.md).")
    ] = "biovid",
    source_subjects: Annotated[int | None, typer.Option(help="Source subjects (default: profile's).")] = None,
    target_subjects: Annotated[int | None, typer.Option(help="Target subjects (default: profile's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed; same seed, same cohort.")] = 0,
    light: Annotated[
        bool, typer.Option("--light", help="Fewer, shorter, smaller clips (scale tests).")
    ] = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Render the subjects as Ray tasks on this cluster (auto or HOST:PORT); the files come "
            "back here, so no folder is shared (docs/scale.md). Same cohort, byte for byte."
        ),
    ] = None,
) -> None:
    """Generate a cohort: videos, sidecars, manifest.json and config.json."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pft.core.cohort import CohortConfig, make_cohort

    try:
        config = CohortConfig(
            profile=profile,
            seed=seed,
            source_subjects=source_subjects,
            target_subjects=target_subjects,
            light=light,
            workers=workers,
        )
    except ValidationError as exc:
        _console.print(f"[red]invalid cohort config:[/red] {exc}")
        raise typer.Exit(2) from exc
    if ray_address is not None:
        from pft.simulations.cluster import check_ray_address

        try:
            check_ray_address(ray_address)
        except PFTError as exc:
            _console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]cohort[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_console,
    ) as bar:
        task = bar.add_task(config.profile, total=config.n_source + config.n_target)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if ray_address is not None:
            from pft.simulations.cohort_ray import make_cohort_on_ray

            try:
                manifest = make_cohort_on_ray(config, out, ray_address, progress=progress)
            except PFTError as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(1) from exc
        else:
            manifest = make_cohort(config, out, progress=progress)
    seconds = time.perf_counter() - start
    size_mb = _folder_size(out) / 1e6
    _console.print(
        f"{config.profile}: {config.n_source} source + {config.n_target} target subjects, "
        f"{len(manifest.videos)} videos in {seconds:.1f} s, {size_mb:.1f} MB -> {out}"
    )


@cohort_app.command("preview")
def preview(
    cohort_dir: Annotated[Path, typer.Argument(help="A cohort folder.")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("cohort.png"),
    subjects: Annotated[int, typer.Option(help="Rows (subjects) in the sheet.")] = 8,
) -> None:
    """Write a contact sheet (subjects x classes, apex frames)."""
    require_extra("cohort preview", "sim", "matplotlib")
    from pft.core.cohort import preview_cohort

    try:
        path = preview_cohort(cohort_dir, out, subjects=subjects)
    except PFTError as exc:
        _console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    _console.print(f"contact sheet -> {path}")


@cohort_app.command("info")
def info(cohort_dir: Annotated[Path, typer.Argument(help="A cohort folder.")]) -> None:
    """Print video counts per split and class."""
    from rich.table import Table

    from pft.core.cohort import load_manifest

    try:
        manifest = load_manifest(cohort_dir)
    except PFTError as exc:
        _console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    counts = manifest.counts()
    table = Table(title=f"{manifest.profile} (seed {manifest.seed}) - {cohort_dir}")
    table.add_column("split")
    for name in manifest.classes:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split in ("train", "adapt", "oracle", "eval"):
        row = counts.get(split, {})
        table.add_row(split, *[str(row.get(c, 0)) for c in manifest.classes], str(sum(row.values())))
    _console.print(table)
    n_src = len(manifest.subjects_of("source"))
    n_tgt = len(manifest.subjects_of("target"))
    leaning = sum(s.resting_leans for s in manifest.subjects)
    _console.print(
        f"{n_src} source + {n_tgt} target subjects ({leaning} with a leaning resting face), "
        f"{manifest.frame_size}px, {manifest.frames_per_clip} frames at {manifest.fps} fps"
    )
