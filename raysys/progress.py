"""Progress for long CLI work: a rich progress bar on a terminal, plain lines elsewhere (job logs,
CI, pipes), so a log never fills with bar redraws. `raysys run` has its own live view
(raysys/runner.py); this serves `raysys profile` and `raysys agent train`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: float,
             by_time: bool = False) -> Iterator[Callable[[str], None]]:
    """Yields `report(line)`: prints `line` (above the bar on a terminal) and advances the bar by
    one unit, or, with `by_time`, to the seconds elapsed (for work bounded by a time budget)."""
    if not sys.stdout.isatty():
        yield print
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    task = bar.add_task(description, total=total)
    start = time.monotonic()

    def report(line: str) -> None:
        bar.console.print(line)
        if by_time:
            bar.update(task, completed=min(total, time.monotonic() - start))
        else:
            bar.advance(task)

    with bar:
        yield report
