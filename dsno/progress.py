"""Progress bars of the long stages (data_gen, sample_images, the USF search, eval): one look, on stderr.

    with progress_bar(enabled) as bar:              # a rich Progress
        task = bar.add_task("shards", total=n)
        bar.advance(task)
    with counter("sampling", total, enabled) as advance:
        advance(k)

A bar is drawn only when it is enabled and stderr is a terminal; elsewhere (CI logs, pipes,
tests) it tracks its tasks and prints nothing, and the stages' log lines tell the progress.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich Progress (description, bar, done/total, elapsed, remaining) on `console` (default
    stderr), disabled unless `enabled` and the console is a terminal. Use it as a context manager."""
    console = console or Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not (enabled and console.is_terminal))


@contextlib.contextmanager
def counter(description: str, total: int, enabled: bool = True,
            console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """One bar of `total` steps; yields advance(k)."""
    with progress_bar(enabled, console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k=1: bar.advance(task, k)
