"""Progress bars of the long stages (data_gen, sample_images, the USF search, eval): one look, on stderr.

    with progress_bar(enabled) as bar:              # a rich Progress
        task = bar.add_task("shards", total=n)
        bar.advance(task)
    with counter("sampling", total, enabled) as advance:
        advance(k)

A bar is drawn only when it is enabled and stderr is a terminal. Enabled without a terminal (output
to a file, CI logs, pipes) it logs one line `<task> done/total (p%), elapsed, ~left` each time a task
passes another tenth of its total (`LoggedProgress`); disabled, it tracks its tasks and prints nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

log = logging.getLogger("dsno")

LOG_STEPS = 10          # without a terminal: one line per tenth of a task


class LoggedProgress(Progress):
    """A Progress that draws nothing and logs a line each time a task passes another 1/LOG_STEPS of its total."""

    def __init__(self, *columns: Any, **kwargs: Any):
        super().__init__(*columns, **{**kwargs, "disable": True})
        self._logged: dict[TaskID, int] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def _maybe_log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not task.total:
            return
        tenth = int(LOG_STEPS * min(task.completed, task.total) / task.total)
        if tenth <= self._logged.get(task_id, 0):
            return
        self._logged[task_id] = tenth
        elapsed = task.elapsed or 0.0
        left = elapsed * (task.total - task.completed) / task.completed if task.completed else 0.0
        log.info("%s %d/%d (%d%%), %s elapsed%s", task.description, task.completed, task.total,
                 100 * task.completed // task.total, _clock(elapsed),
                 f", ~{_clock(left)} left" if task.completed < task.total else "")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def progress_bar(enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich Progress (description, bar, done/total, elapsed, remaining) on `console` (default
    stderr) when `enabled` and the console is a terminal; enabled elsewhere, a `LoggedProgress`;
    else a disabled one. Use it as a context manager."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    if enabled and not console.is_terminal:
        return LoggedProgress(*columns, console=console)
    return Progress(*columns, console=console, disable=not enabled)


@contextlib.contextmanager
def counter(description: str, total: int, enabled: bool = True,
            console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """One bar of `total` steps; yields advance(k)."""
    with progress_bar(enabled, console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k=1: bar.advance(task, k)
