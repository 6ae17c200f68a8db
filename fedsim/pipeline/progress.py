"""Progress bars with ETA for a run's long stages: training rounds, an attack's iterations.

A bar shows only on a console that is a terminal and not quiet (`shows_progress`); captured
output, a log file or the quiet Python API get the stages' lines alone, and no bar costs time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsim.core.attack import IterationCallback, ReconstructionAttack


def shows_progress(console: Console) -> bool:
    """True when `console` draws live bars: a terminal, not quiet."""
    return console.is_terminal and not console.quiet


@contextmanager
def progress_bar(console: Console, description: str, unit: str) -> Iterator[IterationCallback | None]:
    """A bar that disappears when done; yields its `update(done, total)`, or None when
    `console` shows no bars. Lines printed on `console` meanwhile appear above it."""
    if not shows_progress(console):
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        speed_estimate_period=7 * 24 * 3600,  # ETA from the mean rate since the start
    ) as progress:
        task = progress.add_task(description, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@contextmanager
def attack_progress(attack: ReconstructionAttack, console: Console, description: str) -> Iterator[None]:
    """A bar over the iterations `attack` reports while the block runs (`on_iteration`)."""
    with progress_bar(console, description, "iterations") as update:
        attack.on_iteration = update
        try:
            yield
        finally:
            attack.on_iteration = None
