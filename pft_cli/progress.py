"""Rich progress bars for long work, shared by the CLI's commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

console = Console(stderr=True)


def plain_lines() -> bool:
    """Whether progress goes to a log, not a terminal (a batch job, ``nohup``, CI): then one line
    per stage is printed instead of a live display, which rich does not draw off a terminal."""
    return not console.is_terminal


def stage_line(description: str, total: int | None, started: float) -> None:
    """One progress line for a log: ``[     12 s] stage 1: source model F, C (12 steps)``."""
    import time

    steps = f" ({total} steps)" if total is not None and total > 1 else ""
    console.print(
        f"[{time.monotonic() - started:7.0f} s] {description}{steps}", markup=False, highlight=False
    )


def live_progress(description_width: int) -> Progress:
    """The live display every command shows on a terminal: description, bar, done/total, elapsed
    and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"{{task.description:<{description_width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@contextmanager
def stage_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int, int], None]]]:
    """Yield a factory ``bar(description, total) -> step(done, total)``: one bar per stage."""
    if not enabled:
        yield lambda _d, _t: lambda _a, _b: None
        return
    if plain_lines():
        import time

        started = time.monotonic()

        def plain(description: str, total: int) -> Callable[[int, int], None]:
            stage_line(description, total, started)
            return lambda _a, _b: None

        yield plain
        return
    with live_progress(40) as progress:
        tasks: dict[str, TaskID] = {}

        def factory(description: str, total: int) -> Callable[[int, int], None]:
            task = progress.add_task(description, total=max(total, 1))
            tasks[description] = task

            def step(done: int, new_total: int) -> None:
                progress.update(task, completed=done, total=max(new_total, 1))

            return step

        yield factory
