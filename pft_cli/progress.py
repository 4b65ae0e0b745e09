"""Rich progress bars for long work, shared by the CLI's commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import TaskID

console = Console(stderr=True)


@contextmanager
def stage_bars(enabled: bool = True) -> Iterator[Callable[[str, int], Callable[[int, int], None]]]:
    """Yield a factory ``bar(description, total) -> step(done, total)``: one bar per stage."""
    if not enabled:
        yield lambda _d, _t: lambda _a, _b: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def factory(description: str, total: int) -> Callable[[int, int], None]:
            task = progress.add_task(description, total=max(total, 1))
            tasks[description] = task

            def step(done: int, new_total: int) -> None:
                progress.update(task, completed=done, total=max(new_total, 1))

            return step

        yield factory
